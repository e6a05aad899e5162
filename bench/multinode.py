"""Several nodes: 3 front nodes feeding 1 middle tier, against a single node, over network namespaces.

    python -m bench multinode [-d 15] [--connections 50] [--window 32] [--partition 10]

Needs root (``ip netns``; ``bench/netns.py``: a private 10.213.0.0/24 inside the
namespaces only, removed at the end).  In one run:

* **single**: one namespace runs a whole node (web, monitor, router, publisher,
  store, fanout; ``ipc://`` inside), loaded closed-loop by one generator
  (``bench.loadgen``, ``--connections`` x ``--window`` in flight) in the same
  namespace: stored msg/s over ``-d`` seconds (rows of the SQLite store);
* **multi**: namespaces f1, f2, f3 (web + monitor each) -> mid (router, publisher)
  -> sto (store, fanout), every link tcp:// with CURVE, each front node loaded by its
  own generator with the same load: stored msg/s over ``-d`` seconds, as a ratio to
  single;
* **partition**: then f1's link is cut for ``--partition`` seconds: stored msg/s
  and each front node's acked msg/s during the cut (f1 keeps acking into its
  ingress ring), and after the link is back (f1 catches up).

Every process is stopped and every namespace deleted at the end, also on failure.
The machine's cores are shared by all namespaces: on a small machine the ratio says
how much the extra processes cost, not how a cluster of real hosts scales.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any, TextIO

from bench.netns import Topology, unavailable
from node.auth import issue_device_token
from node.curve import CLIENT, SERVER, load_keypair

REPO = Path(__file__).resolve().parent.parent
FRONTS = ("f1", "f2", "f3")
SECRET = "bench-multinode-secret-0123456789"
ROUTER, PUB, REPLAY = 5555, 5556, 5557
WARMUP = 3.0


def env_for(data_dir: Path, **extra: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
    env.update(
        NODE_DATA_DIR=str(data_dir),
        NODE_JWT_SECRET=SECRET,
        NODE_WEB_WORKERS="1",
        NODE_LOG_LEVEL="warning",
        NODE_INGRESS_RING_BYTES=str(64 << 20),
        NODE_FANIN_RING_BYTES=str(256 << 20),
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Run:
    """Processes started inside namespaces; all killed by :meth:`close`."""

    def __init__(self, topo: Topology, root: Path) -> None:
        self.topo, self.root = topo, root
        self.procs: list[subprocess.Popen[Any]] = []

    def stage(self, host: str, kind: str, env: dict[str, str]) -> None:
        with open(self.root / f"{host}-{kind}.log", "ab") as log:
            self.procs.append(
                subprocess.Popen(
                    [*self.topo.exec_prefix(host), sys.executable, "-m", f"node.workers.{kind}"],
                    env=env,
                    cwd=str(REPO),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            )

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


class Generator:
    """``bench.loadgen`` in a namespace, closed loop; per-second acked counts from its ticks."""

    def __init__(
        self, topo: Topology, host: str, url: str, args: argparse.Namespace, duration: float
    ) -> None:
        self.host = host
        devices = [
            [i, f"{host}-dev{i}", issue_device_token(SECRET, f"{host}-dev{i}")]
            for i in range(args.connections)
        ]
        spec = {
            "kind": "iotnode", "url": url, "mode": "max", "rate": 1.0, "window": args.window,
            "duration": duration, "ramp": 500.0, "payload": 64, "encoding": "msgpack", "drain": 2.0,
            "sources": ["127.0.0.1"], "devices": devices,
        }  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [*topo.exec_prefix(host), sys.executable, "-m", "bench.loadgen"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=str(REPO), env=env, text=True,
        )  # fmt: skip
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        self.acked: list[tuple[float, int]] = []  # (monotonic time, acked in that second)
        self.connected = threading.Event()
        self.result: dict[str, Any] | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if msg.get("type") == "connected":
                self.connected.set()
            elif msg.get("type") == "tick":
                self.acked.append((time.monotonic(), int(msg["acked"])))
            elif msg.get("type") == "result":
                self.result = msg

    def go(self, at: float) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"go": at}) + "\n")
        self.proc.stdin.flush()

    def rate(self, t0: float, t1: float) -> float:
        n = sum(a for t, a in self.acked if t0 < t <= t1)
        return n / max(1e-9, t1 - t0)

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def stored(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with closing(sqlite3.connect(path, timeout=10)) as db:
            return int(db.execute("SELECT max(rowid) FROM messages").fetchone()[0] or 0)
    except sqlite3.OperationalError:
        return 0


def wait_log(path: Path, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise SystemExit(f"bench multinode: {path.name} never said {needle!r}")


def start_load(
    topo: Topology, hosts: tuple[str, ...], args: argparse.Namespace, total: float
) -> list[Generator]:
    gens = [Generator(topo, h, "ws://127.0.0.1:8000/v1/ingest", args, total) for h in hosts]
    for g in gens:
        if not g.connected.wait(60):
            raise SystemExit(f"bench multinode: the load generator of {g.host} never connected")
    at = time.time() + 0.5
    for g in gens:
        g.go(at)
    time.sleep(0.5)
    return gens


def window(store: Path, seconds: float) -> tuple[float, float, float]:
    """Stored msg/s over the next ``seconds``: ``(rate, t0, t1)`` (monotonic)."""
    t0, n0 = time.monotonic(), stored(store)
    time.sleep(seconds)
    t1, n1 = time.monotonic(), stored(store)
    return (n1 - n0) / (t1 - t0), t0, t1


def single(topo: Topology, root: Path, args: argparse.Namespace, out: TextIO) -> float:
    d = root / "single"
    d.mkdir()
    run = Run(topo, root)
    try:
        env = env_for(d)
        for kind in ("router", "publisher", "store", "monitor", "web"):
            run.stage("solo", kind, env)
        time.sleep(3)
        gens = start_load(topo, ("solo",), args, WARMUP + args.duration + 2)
        time.sleep(WARMUP)
        rate, t0, t1 = window(d / "store.sqlite3", args.duration)
        print(f"single node: stored {rate:,.0f} msg/s, acked {gens[0].rate(t0, t1):,.0f} msg/s", file=out)
        for g in gens:
            g.wait(args.duration + 60)
        return rate
    finally:
        run.close()


def multi(topo: Topology, root: Path, args: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    dirs = {h: root / h for h in ("mid", "sto", *FRONTS)}
    for p in dirs.values():
        p.mkdir()
    clients, subscribers = root / "clients", root / "subscribers"
    clients.mkdir()
    subscribers.mkdir()
    server_key = load_keypair(dirs["mid"], SERVER).public_path
    for h in FRONTS:
        shutil.copy(load_keypair(dirs[h], CLIENT).public_path, clients / f"{h}.key")
    shutil.copy(load_keypair(dirs["sto"], CLIENT).public_path, subscribers / "sto.key")
    mid = topo.hosts["mid"]
    run = Run(topo, root)
    try:
        env = env_for(
            dirs["mid"], NODE_ROUTER_BIND=f"tcp://{mid}:{ROUTER}", NODE_CURVE_CLIENTS_DIR=clients,
            NODE_PUB_BIND=f"tcp://{mid}:{PUB}", NODE_REPLAY_BIND=f"tcp://{mid}:{REPLAY}",
            NODE_CURVE_SUBSCRIBERS_DIR=subscribers,
        )  # fmt: skip
        run.stage("mid", "router", env)
        run.stage("mid", "publisher", env)
        env = env_for(
            dirs["sto"], NODE_PUB_CONNECT=f"tcp://{mid}:{PUB}", NODE_REPLAY_CONNECT=f"tcp://{mid}:{REPLAY}",
            NODE_CURVE_PUBLISHER_KEY=server_key,
        )  # fmt: skip
        run.stage("sto", "store", env)
        for h in FRONTS:
            env = env_for(
                dirs[h], NODE_ROUTER_CONNECT=f"tcp://{mid}:{ROUTER}", NODE_CURVE_SERVER_KEY=server_key
            )
            run.stage(h, "monitor", env)
            run.stage(h, "web", env)
        time.sleep(3)
        total = WARMUP + args.duration + 2 * args.partition + 4
        gens = start_load(topo, FRONTS, args, total)
        store = dirs["sto"] / "store.sqlite3"
        time.sleep(WARMUP)
        steady, t0, t1 = window(store, args.duration)
        acked = {g.host: g.rate(t0, t1) for g in gens}
        print(
            f"3 front nodes -> 1 middle tier: stored {steady:,.0f} msg/s; acked per front node "
            + ", ".join(f"{h} {r:,.0f}" for h, r in acked.items()),
            file=out,
        )
        topo.cut("f1")
        cut, c0, c1 = window(store, args.partition)
        topo.restore("f1")
        cut_acked = {g.host: g.rate(c0, c1) for g in gens}
        print(
            f"f1 partitioned {args.partition:g}s: stored {cut:,.0f} msg/s; acked "
            + ", ".join(f"{h} {r:,.0f}" for h, r in cut_acked.items()),
            file=out,
        )
        after, a0, a1 = window(store, args.partition)
        print(f"after the link is back ({args.partition:g}s): stored {after:,.0f} msg/s", file=out)
        for g in gens:
            g.wait(total + 60)
        return {
            "stored": steady,
            "acked": acked,
            "partition_stored": cut,
            "partition_acked": cut_acked,
            "after_stored": after,
        }
    finally:
        run.close()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench multinode", description=__doc__.split("\n\n")[0])
    ap.add_argument("-d", "--duration", type=float, default=15.0, help="seconds of measured steady load (15)")
    ap.add_argument("--connections", type=int, default=50, help="device connections per front node (50)")
    ap.add_argument("--window", type=int, default=32, help="messages in flight per connection (32)")
    ap.add_argument("--partition", type=float, default=10.0, help="seconds f1's link is cut (10)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args()
    why = unavailable()
    if why is not None:
        raise SystemExit(f"bench multinode: network namespaces unavailable: {why}")
    root = Path(tempfile.mkdtemp(prefix="iotnode-multinode-"))
    topo = Topology()
    out = sys.stdout
    try:
        topo.create({"solo": 1, "mid": 2, "sto": 3, "f1": 11, "f2": 12, "f3": 13})
        base = single(topo, root, args, out)
        result = multi(topo, root, args, out)
        print(
            f"ratio stored msg/s, 3 front nodes / single node: {result['stored'] / max(1.0, base):.2f}x",
            file=out,
        )
        print(f"during the partition: {result['partition_stored'] / max(1.0, base):.2f}x single", file=out)
    finally:
        topo.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"logs: {root}", file=out)


if __name__ == "__main__":
    main()
