"""Fanout throughput: records published -> JSON frames at K WebSocket clients.

``python -m bench.fanout_stream [--records N] [--clients 1,4,16] [--payload BYTES]``

In one run, on loopback:

* **baseline** -- a bare Python ZeroMQ SUB process (pyzmq, same topic, no decoding)
  reading the same published stream: the cost floor of getting records out of
  ZeroMQ in Python on this machine, measured now, under the same noise.
* **fanout** -- a real ``python -m node.workers.fanout`` process, with K clients
  (websockets, in one separate process) following the device.

For each, records/s from the first publish to the last record received by every
client; for the fanout also its CPU time per record and per delivered frame (from
``/proc``), and the ratio of its records/s to the baseline's.  The bench process
plays the publisher (an XPUB bound at the node's pub endpoint, node.wire format).
The fanout runs with ``NODE_PUB_HWM`` and ``NODE_FANOUT_QUEUE`` large enough that
nothing is dropped: this measures capacity, not the best-effort drop policy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from node import wire
from node.auth import issue_client_token
from node.config import Settings
from node.record import pack_record

REPO = Path(__file__).resolve().parent.parent
SECRET = "bench-fanout-secret-" + "0123456789abcdef" * 2
DEVICE = "bench-device"
RING = b"B" * 16
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- child roles
def _role_sub(endpoint: str, records: int) -> None:
    """Baseline: a bare SUB reading ``records`` messages; prints the last arrival time."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, wire.device_topic(DEVICE))
    sock.connect(endpoint)
    print("ready", flush=True)
    got = 0
    sock.RCVTIMEO = 60_000
    while got < records:
        sock.recv_multipart()
        got += 1
    print(json.dumps({"last": time.monotonic(), "got": got}), flush=True)
    sock.close(0)
    ctx.term()


def _role_clients(url: str, clients: int, records: int) -> None:
    """K websockets clients; prints the time the last of them got record ``records``."""
    from websockets.asyncio.client import connect

    async def one(ws: object, done: list[float]) -> None:
        got = 0
        last_text = ""
        while got < records:
            last_text = await asyncio.wait_for(ws.recv(), 60)  # type: ignore[attr-defined]
            got += 1
        assert json.loads(last_text)["seq"] == records, last_text[:80]
        done.append(time.monotonic())

    async def main() -> None:
        conns = [
            await connect(url, compression=None, max_queue=None, open_timeout=30).__aenter__()
            for _ in range(clients)
        ]
        print("ready", flush=True)
        done: list[float] = []
        cpu0 = time.process_time()
        await asyncio.gather(*(one(ws, done) for ws in conns))
        cpu = time.process_time() - cpu0
        print(json.dumps({"last": max(done), "got": records * clients, "cpu": cpu}), flush=True)
        for ws in conns:
            await ws.close()

    asyncio.run(main())


# ---------------------------------------------------------------- the runs
class Publisher:
    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # never drop on the bench side
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)

    def wait_subscribed(self, timeout: float = 30.0) -> None:
        want = b"\x01" + wire.device_topic(DEVICE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(100) and self.sock.recv() == want:
                return
        raise SystemExit(f"no subscription to {DEVICE!r} within {timeout}s")

    def publish(self, records: int, payload: int) -> float:
        topic = wire.device_topic(DEVICE)
        pad = "x" * payload
        frames = [
            wire.encode_published(
                topic,
                RING,
                i * 64,
                i * 64 + 64,
                pack_record(DEVICE, i, 1.0 * i, 1.7e9 + i, {"i": i, "pad": pad}),
                epoch=1,
                n=i,  # numbered per topic like the publisher's: the fanout's gap check runs
            )
            for i in range(1, records + 1)
        ]
        start = time.monotonic()
        send = self.sock.send_multipart
        for f in frames:
            send(f)
        return start

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def _child(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.fanout_stream", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise SystemExit(f"bench child failed to start: {line!r}")


def _result(proc: subprocess.Popen[str]) -> dict[str, float]:
    assert proc.stdout is not None
    out = proc.stdout.readline()
    proc.wait(timeout=60)
    if not out:
        raise SystemExit("bench child ended without a result")
    return json.loads(out)  # type: ignore[no-any-return]


def run_baseline(endpoint: str, records: int, payload: int) -> float:
    pub = Publisher(endpoint)
    try:
        sub = _child(["--role", "sub", endpoint, str(records)])
        _wait_ready(sub)
        pub.wait_subscribed()
        start = pub.publish(records, payload)
        res = _result(sub)
    finally:
        pub.close()
    return records / (res["last"] - start)


def run_fanout(data_dir: Path, records: int, clients: int, payload: int) -> dict[str, float]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
    env.update(
        NODE_DATA_DIR=str(data_dir),
        NODE_FANOUT_PORT=str(port),
        NODE_JWT_SECRET=SECRET,
        NODE_PUB_HWM="10000000",
        NODE_FANOUT_QUEUE="1000000",
        NODE_LOG_LEVEL="warning",
        PYTHONPATH=str(REPO),
    )
    settings = Settings.from_env(env)
    pub = Publisher(settings.pub_endpoint)
    fanout = subprocess.Popen([sys.executable, "-m", "node.workers.fanout"], cwd=REPO, env=env)
    cl = None
    try:
        deadline = time.monotonic() + 30
        import socket

        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("fanout did not start") from None
                time.sleep(0.05)
        token = issue_client_token(SECRET, [DEVICE])
        cl = _child(
            [
                "--role",
                "clients",
                f"ws://127.0.0.1:{port}/v1/stream?device={DEVICE}&token={token}",
                str(clients),
                str(records),
            ]
        )
        _wait_ready(cl)
        pub.wait_subscribed()
        cpu0 = _cpu_seconds(fanout.pid)
        start = pub.publish(records, payload)
        res = _result(cl)
        cpu = _cpu_seconds(fanout.pid) - cpu0
    finally:
        if cl is not None and cl.poll() is None:
            cl.kill()
        fanout.terminate()
        fanout.wait(timeout=30)
        pub.close()
    elapsed = res["last"] - start
    return {
        "records_per_s": records / elapsed,
        "frames_per_s": records * clients / elapsed,
        "cpu_us_per_record": cpu / records * 1e6,
        "cpu_us_per_frame": cpu / (records * clients) * 1e6,
        "client_cpu_us_per_frame": res["cpu"] / (records * clients) * 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=50_000)
    p.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--payload", type=int, default=32, help="bytes of padding in each record's data")
    p.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.role:
        if a.role[0] == "sub":
            _role_sub(a.role[1], int(a.role[2]))
        else:
            _role_clients(a.role[1], int(a.role[2]), int(a.role[3]))
        return
    data_dir = Path(tempfile.mkdtemp(prefix="fob-", dir="/tmp"))
    try:
        endpoint = Settings.from_env({"NODE_DATA_DIR": str(data_dir)}).pub_endpoint
        base = run_baseline(endpoint, a.records, a.payload)
        print(
            f"command: python -m bench.fanout_stream --records {a.records} --clients {a.clients} --payload "
            f"{a.payload}"
        )
        print(f"baseline  bare pyzmq SUB         {base:>10,.0f} records/s")
        for k in (int(x) for x in a.clients.split(",")):
            r = run_fanout(data_dir, a.records, k, a.payload)
            print(
                f"fanout    {k:>3} client(s)          {r['records_per_s']:>10,.0f} records/s "
                f"{r['frames_per_s']:>10,.0f} frames/s  ratio {r['records_per_s'] / base:5.2f}  "
                f"fanout CPU {r['cpu_us_per_record']:6.1f} us/record {r['cpu_us_per_frame']:6.1f} us/frame  "
                f"(clients' CPU {r['client_cpu_us_per_frame']:5.1f} us/frame)"
            )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
