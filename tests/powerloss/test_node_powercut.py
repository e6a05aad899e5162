"""Issue 12: a whole node loses power at random moments and keeps every acked message exactly once.

Every process of a node (web with 2 workers, monitor, router, publisher, store) runs
for real with the ring's power-loss simulator (``IOTNODE_RING_POWERSIM=1``: a ring
range is on "media" only once the ring persisted it, see ``node/ring/powersim.py``).
Resending devices (half MessagePack, half JSON) send paced messages with a window of
unacked ones.  At seeded random moments the power is cut:

1. every process is frozen with SIGSTOP (nothing moves while the images are taken);
2. each ring file is replaced by a legal post-crash image: the durable image plus a
   random subset of the cache lines (pmem model) or 512-byte sectors (msync model)
   written but not yet persisted; SQLite's files are taken as the kernel holds them
   (the store commits with ``synchronous=FULL``, so what it confirmed is fsynced;
   its WAL-index ``-shm`` is dropped, as a reboot loses it);
3. every process is SIGKILLed and the node restarted on those images.

The devices reconnect and resend whatever was not acked.  At the end every message
of every device is in the store exactly once, each device's messages were stored in
seq order, and both rings drained (no stall).  A second test cuts the power of a
front node only (web + monitor feeding a router over tcp://) while the middle tier
runs on.

Soak: ``IOTNODE_POWERCUT_SEEDS=1,2,3,4,5,6,7,8 python -m pytest tests/powerloss/test_node_powercut.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgpack
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, WebSocketException

from node.auth import issue_device_token
from node.ring.powersim import POWERSIM_ENV, POWERSIM_MODEL_ENV, crash_image, install_image
from tests.support import Processes, free_port, node_env, wait_for_port, wait_until

DEVICES = 16
MESSAGES_PER_DEVICE = 160
WINDOW = 16
CUTS = 2  # power cuts per schedule
RUN_TIMEOUT = 60.0  # seconds for every device to be acked
DRAIN_TIMEOUT = 45.0  # then for the store to hold everything and the rings to drain
MODELS = {"pmem": 64, "msync": 512}  # simulator model -> unit a cut may tear at
SEEDS = [int(x) for x in os.environ.get("IOTNODE_POWERCUT_SEEDS", "5,29").split(",")]
MIDDLE = ("router", "publisher", "store")
PAD = "p" * 400  # ~0.5 KiB records: 2,560 messages (plus resends) wrap the 1 MiB rings


@dataclass
class DeviceStats:
    acked: int = -1
    connections: int = 0
    errors: list[object] = field(default_factory=list)


async def run_device(
    url: str, token: str, device: str, binary: bool, rng: random.Random, stats: DeviceStats, deadline: float
) -> None:
    """Send seqs 0..N-1 paced; after any drop, reconnect and resend everything unacked."""
    last = MESSAGES_PER_DEVICE - 1
    while stats.acked < last:
        if time.monotonic() > deadline:
            raise AssertionError(f"{device}: acked through {stats.acked} of {last} when time ran out")
        try:
            async with connect(
                f"{url}?token={token}", open_timeout=5, ping_interval=None, close_timeout=1
            ) as ws:
                stats.connections += 1
                nxt = stats.acked + 1
                while stats.acked < last:
                    while nxt <= last and nxt - stats.acked <= WINDOW:
                        body = {"seq": nxt, "data": {"device": device, "seq": nxt, "pad": PAD}}
                        await ws.send(msgpack.packb(body) if binary else json.dumps(body))
                        nxt += 1
                        await asyncio.sleep(rng.uniform(0.0, 0.03))
                    frame = await asyncio.wait_for(ws.recv(), timeout=5)
                    reply = msgpack.unpackb(frame) if isinstance(frame, bytes) else json.loads(frame)
                    if "ack" in reply:
                        stats.acked = max(stats.acked, int(reply["ack"]))
                    else:
                        stats.errors.append(reply)
        except (OSError, TimeoutError, InvalidHandshake, WebSocketException):
            await asyncio.sleep(rng.uniform(0.05, 0.3))  # the node went away: back off, reconnect


@dataclass
class Host:
    """The processes of one machine that share a power supply (and a data dir)."""

    name: str
    data_dir: Path
    env: dict[str, str]
    kinds: tuple[str, ...]
    processes: Processes
    cuts: list[dict[str, object]] = field(default_factory=list)

    def start(self, kind: str) -> None:
        self.processes.start(f"{self.name}-{kind}", f"node.workers.{kind}", self.env, self.data_dir.parent)

    def start_all(self) -> None:
        for kind in self.kinds:
            self.start(kind)

    def signal_all(self, sig: int) -> None:
        for kind in self.kinds:
            proc = self.processes.procs.get(f"{self.name}-{kind}")
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)  # each process runs in its own group (web: with its workers)
                except ProcessLookupError:
                    pass

    def power_cut(self, rng: random.Random, granularity: int) -> None:
        """Freeze, take the post-crash images, kill everything, boot on the images."""
        self.signal_all(signal.SIGSTOP)
        time.sleep(0.05)  # a SIGSTOP is delivered asynchronously
        rings = sorted(self.data_dir.glob("*.ring"))
        keep = rng.choice((0.0, 0.5, 1.0))  # nothing / some / all of the unpersisted units
        images = {path: crash_image(path, rng, granularity, keep) for path in rings}
        store = self.data_dir / "store.sqlite3"
        sqlite_files = {p: p.read_bytes() for p in (store, Path(f"{store}-wal")) if p.exists()}
        for kind in self.kinds:
            name = f"{self.name}-{kind}"
            if name in self.processes.procs:
                self.processes.kill(name, signal.SIGKILL)
        for path, image in images.items():
            install_image(path, image)
        for path, content in sqlite_files.items():
            path.write_bytes(content)
        Path(f"{store}-shm").unlink(missing_ok=True)
        self.cuts.append({"rings": [p.name for p in rings], "keep": keep})
        self.start_all()

    def logs(self) -> str:
        return "\n".join(
            f"--- {n}\n{self.processes.log(n)[-3000:]}"
            for n in self.processes.procs
            if n.startswith(self.name)
        )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # ipc:// paths must stay under 107 bytes: pytest's tmp_path may be longer
    path = Path(tempfile.mkdtemp(prefix="pc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def host_env(data_dir: Path, model: str, **overrides: object) -> dict[str, str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    return node_env(
        data_dir,
        NODE_WEB_WORKERS=2,
        NODE_DURABILITY="power",
        NODE_INGRESS_RING_BYTES=1 << 20,  # the smallest rings: with PAD the schedule wraps them
        NODE_FANIN_RING_BYTES=1 << 20,
        NODE_LOG_LEVEL="warning",
        **{POWERSIM_ENV: "1", POWERSIM_MODEL_ENV: model},
        **overrides,
    )


def stored_rows(path: Path) -> list[tuple[int, str, int]]:
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("SELECT rowid, device_id, seq FROM messages ORDER BY rowid").fetchall()
    except sqlite3.OperationalError:  # the table is not there yet
        return []
    finally:
        db.close()


def ring_depth(port: str, ring: str) -> float | None:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith(f'iotnode_ring_depth{{ring="{ring}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return None


async def drive(url: str, secret: str, prefix: str, seed: int, cut: object) -> dict[str, DeviceStats]:
    """Run the devices to the end while ``cut()`` (a thread) cuts the power ``CUTS`` times."""
    rng = random.Random(seed)
    stats = {f"{prefix}-{seed}-{i}": DeviceStats() for i in range(DEVICES)}
    deadline = time.monotonic() + RUN_TIMEOUT

    async def schedule() -> None:
        for _ in range(CUTS):
            await asyncio.sleep(rng.uniform(0.4, 1.6))
            await asyncio.to_thread(cut, random.Random(rng.random()))  # type: ignore[arg-type]

    cutter = asyncio.create_task(schedule())
    devices = [
        run_device(
            url, issue_device_token(secret, d), d, i % 2 == 0, random.Random(rng.random()), s, deadline
        )
        for i, (d, s) in enumerate(stats.items())
    ]
    try:
        await asyncio.gather(*devices)
    finally:
        await cutter
    return stats


def check_stored_exactly_once(
    store: Path, stats: dict[str, DeviceStats], depth_ports: dict[str, str], logs: str
) -> None:
    assert all(s.acked == MESSAGES_PER_DEVICE - 1 for s in stats.values())
    errors = {d: s.errors for d, s in stats.items() if s.errors}
    assert not errors, f"the node answered errors: {errors}"
    expected = {(d, seq) for d in stats for seq in range(MESSAGES_PER_DEVICE)}

    def drained() -> bool:
        keys = {(d, s) for _, d, s in stored_rows(store)}
        return expected <= keys and all(ring_depth(port, ring) == 0 for ring, port in depth_ports.items())

    try:
        wait_until(drained, DRAIN_TIMEOUT, interval=0.25, what="the store to hold everything, rings drained")
    except AssertionError:
        rows = stored_rows(store)
        missing = sorted(expected - {(d, s) for _, d, s in rows})
        depths = {ring: ring_depth(port, ring) for ring, port in depth_ports.items()}
        raise AssertionError(
            f"{len(missing)} acked messages missing (first {missing[:10]}), depths {depths}\n{logs}"
        ) from None
    rows = [r for r in stored_rows(store) if r[1] in stats]
    keys = [(d, s) for _, d, s in rows]
    assert len(keys) == len(set(keys)) == len(expected), (
        "a message was stored twice or an unknown one appeared"
    )
    last: dict[str, int] = {}
    for _, device, seq in rows:  # rowid order: the order the store wrote them
        assert seq > last.get(device, -1), f"{device}: seq {seq} stored after {last[device]}"
        last[device] = seq


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("seed", SEEDS)
def test_power_cuts_of_a_whole_node_keep_every_acked_message_exactly_once(
    seed: int, model: str, short_dir: Path, processes: Processes
) -> None:
    data = short_dir / "data"
    env = host_env(data, model)
    node = Host("node", data, env, (*MIDDLE, "monitor", "web"), processes)
    node.start_all()
    wait_for_port(int(env["NODE_WEB_PORT"]), timeout=30)

    url = f"ws://127.0.0.1:{env['NODE_WEB_PORT']}/v1/ingest"
    stats = asyncio.run(
        drive(
            url, env["NODE_JWT_SECRET"], f"pc-{model}", seed, lambda rng: node.power_cut(rng, MODELS[model])
        )
    )

    assert len(node.cuts) == CUTS
    assert sum(s.connections for s in stats.values()) > DEVICES, "no device was cut off by a power cut"
    depth_ports = {
        "ingress": env["NODE_METRICS_PORT_MONITOR"],
        "fanin": env["NODE_METRICS_PORT_PUBLISHER"],
    }
    check_stored_exactly_once(data / "store.sqlite3", stats, depth_ports, node.logs())


@pytest.mark.slow
def test_a_power_cut_of_a_front_node_only_loses_nothing_over_tcp(
    short_dir: Path, processes: Processes
) -> None:
    """Front node (web + monitor) -> tcp:// -> middle tier (router, publisher, store) on another "host"."""
    router = f"tcp://127.0.0.1:{free_port()}"
    lab = {"NODE_CURVE": "off"}  # the CURVE handshake is tested in tests/pipeline/test_curve.py
    middle_env = host_env(short_dir / "middle", "msync", NODE_ROUTER_BIND=router, **lab)
    middle = Host("middle", short_dir / "middle", middle_env, MIDDLE, processes)
    front_env = host_env(
        short_dir / "front",
        "pmem",
        NODE_ROUTER_CONNECT=router,
        NODE_JWT_SECRET=middle_env["NODE_JWT_SECRET"],
        **lab,
    )
    front = Host("front", short_dir / "front", front_env, ("monitor", "web"), processes)
    middle.start_all()
    front.start_all()
    wait_for_port(int(front_env["NODE_WEB_PORT"]), timeout=30)

    url = f"ws://127.0.0.1:{front_env['NODE_WEB_PORT']}/v1/ingest"
    stats = asyncio.run(
        drive(url, front_env["NODE_JWT_SECRET"], "pc-front", 7, lambda rng: front.power_cut(rng, 64))
    )

    assert len(front.cuts) == CUTS and not middle.cuts
    depth_ports = {
        "ingress": front_env["NODE_METRICS_PORT_MONITOR"],
        "fanin": middle_env["NODE_METRICS_PORT_PUBLISHER"],
    }
    check_stored_exactly_once(
        short_dir / "middle" / "store.sqlite3", stats, depth_ports, front.logs() + middle.logs()
    )
