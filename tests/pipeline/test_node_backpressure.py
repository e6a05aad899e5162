"""Issue 4, back-pressure end to end: a stopped store pushes back to the devices.

A whole node (web with 2 workers, monitor, router, publisher, store, fanout) runs
with the smallest rings.  A client app follows every device on the fanout and
never reads.  The store is stopped; devices keep sending: they are acked until the
rings fill, then acks stop and their sends block (the node stops reading them),
while the web workers' memory stays bounded.  The store comes back: everything
drains, every message is stored exactly once, and the stalled client app did not
hold anything up.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import msgpack
import pytest
from websockets.asyncio.client import connect

from node.auth import issue_client_token, issue_device_token
from tests.pipeline.test_e2e_crash import WholeNode, is_worker, stored_rows
from tests.support import Processes, iter_children, node_env, wait_for_port, wait_until

DEVICES = 6
PAYLOAD = "x" * 2000  # ~2 KiB a message: 1 MiB rings hold a few hundred each
MESSAGES_PER_DEVICE = 1500  # ~18 MiB offered in all, far more than the rings hold
WINDOW = 64  # unacked messages a device keeps in flight
STALL = 3.0  # seconds without a new ack that count as "acks stopped"
RING_BYTES = 1 << 20  # the smallest ring NODE_*_RING_BYTES accepts


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Device:
    def __init__(self, name: str, token: str, binary: bool) -> None:
        self.name, self.token, self.binary = name, token, binary
        self.sent = -1
        self.acked = -1
        self.last_ack_at = time.monotonic()

    async def run(self, url: str) -> None:
        async with connect(f"{url}?token={self.token}", ping_interval=None, close_timeout=1) as ws:

            async def read_acks() -> None:
                async for frame in ws:
                    reply = msgpack.unpackb(frame) if isinstance(frame, bytes) else json.loads(frame)
                    assert "ack" in reply, f"{self.name}: the node answered {reply}"
                    if reply["ack"] > self.acked:
                        self.acked = reply["ack"]
                        self.last_ack_at = time.monotonic()
                    if self.acked == MESSAGES_PER_DEVICE - 1:
                        return

            reader = asyncio.create_task(read_acks())
            for seq in range(MESSAGES_PER_DEVICE):
                while seq - self.acked > WINDOW:
                    await asyncio.sleep(0.01)
                body = {"seq": seq, "data": {"seq": seq, "pad": PAYLOAD}}
                await ws.send(msgpack.packb(body) if self.binary else json.dumps(body))
                self.sent = seq
            await asyncio.wait_for(reader, timeout=120)


async def stalled_client_app(url: str, token: str, opened: asyncio.Event, stop: asyncio.Event) -> None:
    """Follows every device and never reads a frame."""
    async with connect(f"{url}?device=*&token={token}", max_queue=1, ping_interval=None, close_timeout=1):
        opened.set()
        await stop.wait()


def web_workers(node: WholeNode) -> list[int]:
    return [w for w in iter_children(node.processes.procs["web"].pid) if is_worker(w)]


async def scenario(node: WholeNode) -> tuple[list[Device], dict[str, int]]:
    env = node.env
    url = f"ws://127.0.0.1:{env['NODE_WEB_PORT']}/v1/ingest"
    secret = env["NODE_JWT_SECRET"]
    devices = [Device(f"bp-{i}", issue_device_token(secret, f"bp-{i}"), i % 2 == 0) for i in range(DEVICES)]
    opened, stop_app = asyncio.Event(), asyncio.Event()
    app = asyncio.create_task(
        stalled_client_app(
            f"ws://127.0.0.1:{env['NODE_FANOUT_PORT']}/v1/stream",
            issue_client_token(secret, ["*"]),
            opened,
            stop_app,
        )
    )
    await asyncio.wait_for(opened.wait(), timeout=15)
    workers = web_workers(node)
    rss_before = sum(rss_kib(w) for w in workers)

    await asyncio.to_thread(node.processes.kill, "store", signal.SIGTERM)  # the store is stopped
    tasks = [asyncio.create_task(d.run(url)) for d in devices]

    # Acks flow until the rings are full, then stop: every device is stuck short of its end.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        assert not any(t.done() and t.exception() for t in tasks), [t.exception() for t in tasks if t.done()]
        if all(d.acked >= 0 for d in devices) and all(
            time.monotonic() - d.last_ack_at > STALL for d in devices
        ):
            break
    else:
        raise AssertionError(f"acks never stopped: {[(d.acked, d.sent) for d in devices]}")
    stalled = {d.name: d.acked for d in devices}
    assert all(d.acked < MESSAGES_PER_DEVICE - 1 for d in devices), stalled
    assert all(not t.done() for t in tasks), "a device finished although the store was down"
    # The node stops reading: what a device could hand over is bounded by its window,
    # never the whole stream (the rest waits in the device).
    assert all(d.sent - d.acked <= WINDOW + 1 for d in devices), [(d.sent, d.acked) for d in devices]
    await asyncio.sleep(2)
    assert {d.name: d.acked for d in devices} == stalled, "acks moved while the rings were full"
    rss_grown = sum(rss_kib(w) for w in workers) - rss_before
    assert rss_grown < 64 * 1024, f"web workers grew by {rss_grown} KiB while pushing back"

    node.start("store")  # the store returns: everything drains
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=150)
    stop_app.set()
    await asyncio.wait_for(app, timeout=15)
    return devices, stalled


@pytest.mark.slow
def test_stopped_store_pushes_back_to_devices_then_everything_drains_exactly_once(
    data_dir: Path, tmp_path: Path, processes: Processes
) -> None:
    env = node_env(
        data_dir,
        NODE_WEB_WORKERS=2,
        NODE_INGRESS_RING_BYTES=RING_BYTES,
        NODE_FANIN_RING_BYTES=RING_BYTES,
        NODE_FANOUT_QUEUE=16,
    )
    node = WholeNode(processes, data_dir, tmp_path, env)
    for stage in ("monitor", "router", "publisher", "store", "fanout", "web"):
        node.start(stage)
    wait_for_port(int(env["NODE_WEB_PORT"]), timeout=30)
    wait_for_port(int(env["NODE_FANOUT_PORT"]), timeout=30)
    wait_until(lambda: len(web_workers(node)) == 2, 20, what="two web workers")

    devices, stalled = asyncio.run(scenario(node))

    assert all(d.acked == MESSAGES_PER_DEVICE - 1 for d in devices)
    assert sum(stalled.values()) + DEVICES < DEVICES * MESSAGES_PER_DEVICE  # it really stalled
    expected = {(d.name, seq) for d in devices for seq in range(MESSAGES_PER_DEVICE)}
    store = data_dir / "store.sqlite3"
    wait_until(lambda: len(stored_rows(store)) >= len(expected), 60, what="the store to drain")
    rows = stored_rows(store)
    keys = [(d, s) for d, s, _ in rows]
    assert len(keys) == len(set(keys)) == len(expected), f"{len(keys)} rows for {len(expected)} messages"
    assert set(keys) == expected
    assert all(json.loads(data)["seq"] == seq for _, seq, data in rows)
    crashed = [name for name in node.processes.logs if "Traceback" in node.processes.log(name)]
    assert not crashed, f"unhandled exceptions in {crashed}\n{node.logs()}"
