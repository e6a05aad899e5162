"""CURVE on the publisher's XPUB and replay ROUTER: real publisher, store and fanout processes.

The test appends to the fan-in ring (the router's role) and plays the intruders with
its own ZeroMQ sockets on 127.0.0.1: a loopback tcp:// bind is not an open door.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
import zmq

from node import wire
from node.auth import issue_client_token
from node.curve import CLIENT, SERVER, key_paths, load_keypair
from node.record import pack_record
from node.ring import Ring
from tests.support import REPO, Processes, free_port, node_env, wait_for_port, wait_until

QUIET = 1.5  # seconds an intruder is given to get something
FANIN_BYTES = 8 << 20  # node_env's NODE_FANIN_RING_BYTES


@pytest.fixture
def sockets() -> Iterator[Callable[[int], zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    made: list[zmq.Socket[bytes]] = []

    def make(kind: int) -> zmq.Socket[bytes]:
        sock = context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        made.append(sock)
        return sock

    try:
        yield make
    finally:
        for sock in made:
            sock.close(linger=0)
        context.term()


def tcp_env(data_dir: Path, **env: object) -> dict[str, str]:
    """A node whose publisher binds loopback tcp:// for both sockets (CURVE on by default)."""
    return node_env(
        data_dir,
        NODE_PUB_BIND=f"tcp://127.0.0.1:{free_port()}",
        NODE_REPLAY_BIND=f"tcp://127.0.0.1:{free_port()}",
        **env,
    )


def fanin(data_dir: Path) -> Ring:
    path = data_dir / "fanin.ring"
    wait_until(path.exists, 15, what="the publisher to create the fan-in ring")
    return Ring.open(path, capacity=FANIN_BYTES, durability="process")


def append(ring: Ring, start: int, stop: int, device: str = "dev") -> None:
    records = [pack_record(device, i, None, time.time(), {"i": i}) for i in range(start, stop)]
    done = 0
    deadline = time.monotonic() + 20
    while done < len(records):
        done += ring.append_batch(records[done:])
        assert time.monotonic() < deadline, "fan-in ring stayed full"
        if done < len(records):
            time.sleep(0.01)


def stored(data_dir: Path) -> list[tuple[str, int]]:
    path = data_dir / "store.sqlite3"
    if not path.exists():
        return []
    try:
        with closing(sqlite3.connect(path, timeout=5)) as db:
            return db.execute("SELECT device_id, seq FROM messages ORDER BY rowid").fetchall()
    except sqlite3.OperationalError:
        return []


def wait_started(processes: Processes, name: str, needle: str) -> None:
    proc = processes.procs[name]
    wait_until(lambda: proc.poll() is not None or needle in processes.log(name), 20, what=f"{name} up")
    assert proc.poll() is None, processes.log(name)


def curve_socket(
    sockets: Callable[[int], zmq.Socket[bytes]], kind: int, server_key: bytes, pair: tuple[bytes, bytes]
) -> zmq.Socket[bytes]:
    sock = sockets(kind)
    sock.curve_publickey, sock.curve_secretkey = pair
    sock.curve_serverkey = server_key
    return sock


def received(sock: zmq.Socket[bytes], seconds: float) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            out.append(sock.recv_multipart())
    return out


def test_unknown_key_and_plain_subscribers_get_nothing_from_a_loopback_tcp_publisher(
    data_dir: Path, tmp_path: Path, processes: Processes, sockets: Callable[[int], zmq.Socket[bytes]]
) -> None:
    env = tcp_env(data_dir)
    processes.start("publisher", "node.workers.publisher", env, tmp_path)
    wait_started(processes, "publisher", "publisher: fan-in ring")
    server = load_keypair(data_dir, SERVER).public
    own = load_keypair(data_dir, CLIENT)
    subs = {
        "unknown key": curve_socket(sockets, zmq.SUB, server, zmq.curve_keypair()),
        "no CURVE": sockets(zmq.SUB),
        "this node's key": curve_socket(sockets, zmq.SUB, server, (own.public, own.secret)),
    }
    for sock in subs.values():
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(env["NODE_PUB_BIND"])
    time.sleep(0.5)  # the authorized subscription reaches the XPUB
    ring = fanin(data_dir)
    try:
        deadline = time.monotonic() + QUIET
        i = 0
        got: dict[str, list[list[bytes]]] = {name: [] for name in subs}
        while time.monotonic() < deadline:
            append(ring, i, i + 10)
            i += 10
            for name, sock in subs.items():
                got[name].extend(received(sock, 0.05))
    finally:
        ring.close()
    records = [m for m in got["this node's key"] if len(m) == 3]
    assert records, "the authorized subscriber got nothing: the intruders' silence proves nothing"
    assert got["unknown key"] == [] and got["no CURVE"] == [], {k: len(v) for k, v in got.items()}
    assert "refused a CURVE client" in processes.log("publisher")


def test_unknown_key_and_plain_dealers_confirm_pops_nothing_and_fetch_gets_nothing(
    data_dir: Path, tmp_path: Path, processes: Processes, sockets: Callable[[int], zmq.Socket[bytes]]
) -> None:
    env = tcp_env(data_dir)
    processes.start("publisher", "node.workers.publisher", env, tmp_path)
    wait_started(processes, "publisher", "publisher: fan-in ring")
    ring = fanin(data_dir)
    try:
        append(ring, 0, 200)
        assert ring.depth == 200
        server = load_keypair(data_dir, SERVER).public
        intruders = [curve_socket(sockets, zmq.DEALER, server, zmq.curve_keypair()), sockets(zmq.DEALER)]
        for sock in intruders:
            sock.connect(env["NODE_REPLAY_BIND"])
            sock.send_multipart(wire.encode_fetch(b"", 0, 0), zmq.NOBLOCK)  # a probe: learns the ring id
            sock.send_multipart(wire.encode_confirm("store", ring.incarnation, ring.tail), zmq.NOBLOCK)
        deadline = time.monotonic() + QUIET
        while time.monotonic() < deadline:
            for sock in intruders:
                assert received(sock, 0.05) == []
            assert ring.depth == 200 and ring.head == 0
        # The same CONFIRM from a socket holding this node's client key (the store's) pops.
        own = load_keypair(data_dir, CLIENT)
        store = curve_socket(sockets, zmq.DEALER, server, (own.public, own.secret))
        store.connect(env["NODE_REPLAY_BIND"])
        store.send_multipart(wire.encode_confirm("store", ring.incarnation, ring.tail))
        wait_until(lambda: ring.depth == 0, 10, what="the authorized CONFIRM to release the ring")
    finally:
        ring.close()
    assert processes.log("publisher").count("refused a CURVE client") >= 1


def test_store_and_fanout_of_another_node_work_over_tcp_once_authorized_and_after_a_publisher_restart(
    tmp_path: Path, processes: Processes
) -> None:
    middle, other = tmp_path / "middle", tmp_path / "other"
    subscribers = tmp_path / "subscribers"
    for d in (middle, other, subscribers):
        d.mkdir()
    pub_env = tcp_env(middle, NODE_CURVE_SUBSCRIBERS_DIR=subscribers)
    processes.start("publisher", "node.workers.publisher", pub_env, tmp_path)
    wait_started(processes, "publisher", "publisher: fan-in ring")
    sub_env = node_env(
        other,
        NODE_PUB_CONNECT=pub_env["NODE_PUB_BIND"],
        NODE_REPLAY_CONNECT=pub_env["NODE_REPLAY_BIND"],
        NODE_CURVE_PUBLISHER_KEY=key_paths(middle, SERVER)[0],
    )
    # Started before the middle tier lists their key: refused, retrying.
    processes.start("store", "node.workers.store", sub_env, tmp_path)
    processes.start("fanout", "node.workers.fanout", sub_env, tmp_path)
    wait_until(lambda: "refused the connection handshake" in processes.log("store"), 20, what="store refused")
    ring = fanin(middle)
    try:
        append(ring, 0, 100)
        time.sleep(QUIET)
        assert stored(other) == [] and ring.depth == 100
        # The operator copies the other node's client key into the subscribers directory.
        shutil.copy(key_paths(other, CLIENT)[0], subscribers / "other.key")
        wait_until(lambda: len(stored(other)) == 100, 30, what="100 stored once authorized")
        wait_until(lambda: ring.depth == 0, 10, what="the store's CONFIRM to release the ring")
        wait_for_port(int(sub_env["NODE_FANOUT_PORT"]))
        frames = asyncio.run(stream_while(sub_env, ring, 100, 150))
        assert [f["seq"] for f in frames] == list(range(100, 150)), frames[:3]
        # Publisher SIGKILLed and restarted: both clients come back on their own (same key).
        processes.kill("publisher")
        append(ring, 150, 200)
        pub_env["NODE_METRICS_PORT_PUBLISHER"] = str(free_port())
        processes.start("publisher", "node.workers.publisher", pub_env, tmp_path)
        wait_until(lambda: len(stored(other)) == 200, 30, what="200 stored after the restart")
        frames = asyncio.run(stream_while(sub_env, ring, 200, 250))
        assert [f["seq"] for f in frames] == list(range(200, 250))
        wait_until(lambda: len(stored(other)) == 250, 30, what="250 stored")
    finally:
        ring.close()
    rows = stored(other)
    assert rows == [("dev", i) for i in range(250)], rows[:5]
    assert "CURVE on tcp://" in processes.log("store")


async def stream_while(env: dict[str, str], ring: Ring, start: int, stop: int) -> list[dict[str, object]]:
    """Open a client-app stream on the fanout, append ``start..stop`` and collect them."""
    import websockets

    token = issue_client_token(env["NODE_JWT_SECRET"], ["dev"])
    url = f"ws://127.0.0.1:{env['NODE_FANOUT_PORT']}/v1/stream?device=dev&token={token}"
    async with websockets.connect(url, open_timeout=10) as ws:
        await asyncio.sleep(0.5)  # the subscription travels to the XPUB
        append(ring, start, stop)
        out: list[dict[str, object]] = []
        deadline = time.monotonic() + 20
        while len(out) < stop - start and time.monotonic() < deadline:
            try:
                out.append(json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic())))
            except TimeoutError:
                break
        return out


@pytest.mark.parametrize(
    ("name", "env", "variable"),
    [
        ("publisher", {"NODE_PUB_BIND": "tcp://0.0.0.0:{port}"}, "NODE_CURVE_SUBSCRIBERS_DIR"),
        ("publisher", {"NODE_REPLAY_BIND": "tcp://0.0.0.0:{port}"}, "NODE_CURVE_SUBSCRIBERS_DIR"),
        ("store", {"NODE_REPLAY_CONNECT": "tcp://10.213.0.9:{port}"}, "NODE_CURVE_PUBLISHER_KEY"),
        ("fanout", {"NODE_PUB_CONNECT": "tcp://10.213.0.9:{port}"}, "NODE_CURVE_PUBLISHER_KEY"),
        ("store", {"NODE_CURVE_PUBLISHER_KEY": "short"}, "NODE_CURVE_PUBLISHER_KEY"),
        ("publisher", {"NODE_CURVE_SUBSCRIBERS_DIR": "/nonexistent/iotnode"}, "NODE_CURVE_SUBSCRIBERS_DIR"),
    ],
)
def test_publisher_curve_misconfiguration_exits_2_naming_the_variable(
    data_dir: Path, tmp_path: Path, processes: Processes, name: str, env: dict[str, str], variable: str
) -> None:
    port = free_port()
    proc = processes.start(
        name,
        f"node.workers.{name}",
        node_env(data_dir, **{k: v.format(port=port) for k, v in env.items()}),
        tmp_path,
    )
    assert proc.wait(timeout=30) == 2, processes.log(name)
    assert variable in processes.log(name)


def test_curve_off_runs_the_publisher_open_and_warns(
    data_dir: Path, tmp_path: Path, processes: Processes
) -> None:
    env = tcp_env(data_dir, NODE_CURVE="off")
    processes.start("publisher", "node.workers.publisher", env, tmp_path)
    processes.start("store", "node.workers.store", env, tmp_path)
    ring = fanin(data_dir)
    try:
        append(ring, 0, 20)
        wait_until(lambda: len(stored(data_dir)) == 20, 30, what="20 stored without CURVE")
    finally:
        ring.close()
    for name, variable in (("publisher", "NODE_PUB_BIND"), ("publisher", "NODE_REPLAY_BIND"), ("store", "")):
        lines = [line for line in processes.log(name).splitlines() if "NODE_CURVE=off" in line]
        assert lines and all(" WARNING " in line for line in lines), processes.log(name)
        assert variable in "\n".join(lines)


def test_ipc_sockets_are_owner_only_whatever_the_umask(data_dir: Path, tmp_path: Path) -> None:
    env = node_env(data_dir)
    procs = []
    for name in ("router", "publisher"):
        with open(tmp_path / f"{name}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", f"node.workers.{name}"],
                    env=env,
                    cwd=str(REPO),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    umask=0,
                )
            )
    try:
        names = ("router.sock", "pub.sock", "replay.sock")
        wait_until(lambda: all((data_dir / n).exists() for n in names), 20, what="the ipc sockets")
        for n in names:
            mode = stat.S_IMODE(os.stat(data_dir / n).st_mode)
            assert mode & 0o077 == 0, f"{n} has mode {mode:04o}"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
