"""Many connections, a SIGKILLed worker, and bad configuration: real processes only."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import msgpack
import pytest
import websockets

from tests.front.conftest import Front, start_front
from tests.support import Processes, iter_children, node_env, ring_envelopes, run_module

pytestmark = pytest.mark.timeout(180)


def test_a_thousand_concurrent_connections_each_get_their_acks(front: Front) -> None:
    connections, per_connection = 1000, 3

    async def device(i: int, opened: list[int], everyone: asyncio.Event) -> int:
        async with front.connect(f"many-{i}", ping_interval=None) as ws:
            opened[0] += 1
            if opened[0] == connections:
                everyone.set()
            await asyncio.wait_for(everyone.wait(), 90)  # all 1,000 open at once
            for seq in range(per_connection):
                await ws.send(msgpack.packb({"seq": seq, "data": {"i": i}}))
            last = -1
            while last < per_connection - 1:
                last = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60))["ack"]
            return last

    async def go() -> list[int]:
        opened = [0]
        everyone = asyncio.Event()
        return await asyncio.gather(*(device(i, opened, everyone) for i in range(connections)))

    acks = asyncio.run(asyncio.wait_for(go(), 150))
    assert acks == [per_connection - 1] * connections


def _worker_with_most_sockets(parent: int) -> int:
    def sockets(pid: int) -> int:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            return sum(1 for fd in fds if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"))
        except OSError:
            return -1

    workers = list(iter_children(parent))
    workers = [pid for pid in workers if "spawn_main" in _cmdline(pid)]  # not the resource tracker
    assert len(workers) == 2, f"expected 2 uvicorn workers under {parent}, got {workers}"
    return max(workers, key=sockets)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_every_acked_message_survives_sigkill_of_a_worker(
    data_dir: Path, tmp_path: Path, processes: Processes
) -> None:
    front = start_front(data_dir, tmp_path, processes)
    devices, window = 8, 64
    acked: dict[str, int] = {}
    sent: dict[str, int] = {}
    closed_at: dict[str, float] = {}
    node_killed_at = [0.0]

    async def device(name: str, stop: asyncio.Event) -> None:
        acked[name], sent[name] = -1, 0
        try:
            async with front.connect(name, ping_interval=None) as ws:

                async def reader() -> None:
                    async for frame in ws:
                        acked[name] = max(acked[name], msgpack.unpackb(frame)["ack"])

                read_task = asyncio.create_task(reader())
                try:
                    seq = 0
                    while not stop.is_set() and seq < 200_000 and not read_task.done():
                        if seq - acked[name] > window:
                            await asyncio.sleep(0.001)
                            continue
                        await ws.send(
                            msgpack.packb({"seq": seq, "data": {"d": name, "s": seq, "pad": "x" * 64}})
                        )
                        seq += 1
                        sent[name] = seq
                finally:
                    read_task.cancel()
        except (websockets.ConnectionClosed, OSError):
            pass  # the device's worker (or the node) was killed
        closed_at[name] = time.monotonic()

    async def go() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(device(f"crash-{i}", stop)) for i in range(devices)]
        await asyncio.sleep(1.5)
        assert sum(a + 1 for a in acked.values()) > 0, "no acks before the kill"
        victim = _worker_with_most_sockets(processes.procs["web"].pid)
        os.kill(victim, signal.SIGKILL)
        await asyncio.sleep(0.5)
        node_killed_at[0] = time.monotonic()
        processes.kill("web", signal.SIGKILL)  # then the whole node, mid-flight
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)

    asyncio.run(asyncio.wait_for(go(), 90))
    assert sum(a + 1 for a in acked.values()) > devices * 10
    victims = [n for n, t in closed_at.items() if t < node_killed_at[0]]
    assert victims, "no device was connected to the killed worker"
    print(f"acked {sum(a + 1 for a in acked.values())} messages; {len(victims)} devices lost their worker")
    records = ring_envelopes(data_dir / "ingress.ring")
    seen: dict[str, set[int]] = {}
    for record in records:  # every record decodes and holds what its device sent
        assert record.data == {"d": record.device_id, "s": record.seq, "pad": "x" * 64}
        seen.setdefault(record.device_id, set()).add(record.seq)
    for name, last in acked.items():
        missing = set(range(last + 1)) - seen.get(name, set())
        assert not missing, (
            f"{name}: acked up to {last} but {len(missing)} missing, e.g. {sorted(missing)[:5]}"
        )


@pytest.mark.parametrize(
    "variable,value",
    [("NODE_WEB_WORKERS", "zero"), ("NODE_MAX_MESSAGE_BYTES", "10"), ("NODE_WS_PING_INTERVAL", "-1")],
)
def test_bad_node_variable_makes_web_exit_nonzero_naming_it(
    data_dir: Path, variable: str, value: str
) -> None:
    env = node_env(data_dir, **{variable: value})
    out = run_module("node.workers.web", env=env)
    assert out.returncode == 2
    assert variable in out.stderr and repr(value) in out.stderr


def test_port_in_use_makes_web_exit_nonzero_naming_it(data_dir: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = node_env(data_dir, NODE_WEB_PORT=port)
        out = run_module("node.workers.web", env=env)
    assert out.returncode != 0 and f"NODE_WEB_PORT={port}" in out.stderr
