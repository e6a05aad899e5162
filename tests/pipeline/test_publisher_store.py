"""Publisher + store as real processes over real ipc:// sockets, a real fan-in ring
and a real SQLite file.  The test is the fan-in ring's producer (the router's role)."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import zmq

from node import wire
from node.pipeline.publisher import PARK_TIMEOUT
from node.pipeline.store import FETCH_TIMEOUT
from node.record import pack_record, unpack_record
from node.ring import Ring
from tests.support import Processes, free_port, node_env, wait_until

DEVICES = 7


def envelope(i: int) -> bytes:
    """Record ``i``: device ``dev{i % 7}``, seq ``i``, ts absent on odd ``i``."""
    return pack_record(
        f"dev{i % DEVICES}",
        i,
        None if i % 2 else 1000.0 + i,
        1_700_000_000.0 + i,
        {"i": i, "s": "é" * (i % 3)},
    )


class Pipeline:
    """A publisher and a store on a private data dir; the test appends to the fan-in ring."""

    def __init__(self, data_dir: Path, processes: Processes, **env: object) -> None:
        self.data_dir = data_dir
        self.processes = processes
        self.env = node_env(data_dir, **env)
        self._ring: Ring | None = None

    def start(self, name: str) -> None:
        # A fresh metrics port at every (re)start: on this shared machine another suite
        # may have taken the port a killed stage held.
        self.env[f"NODE_METRICS_PORT_{name.upper()}"] = str(free_port())
        self.processes.start(name, f"node.workers.{name}", self.env, self.data_dir.parent)

    @property
    def ring(self) -> Ring:
        if self._ring is None:
            path = self.data_dir / "fanin.ring"
            wait_until(path.exists, 15, what="the publisher to create the fan-in ring")
            self._ring = Ring.open(
                path, capacity=int(self.env["NODE_FANIN_RING_BYTES"]), durability="process"
            )
        return self._ring

    def append(self, start: int, stop: int, timeout: float = 20.0) -> None:
        """Append records ``start..stop-1``, waiting (bounded) while the ring is full."""
        i = start
        deadline = time.monotonic() + timeout
        while i < stop:
            n = self.ring.append_batch([envelope(j) for j in range(i, min(stop, i + 100))])
            i += n
            if n == 0:
                assert time.monotonic() < deadline, f"fan-in ring stayed full at record {i}"
                time.sleep(0.005)

    def rows(self) -> list[tuple[Any, ...]]:
        path = self.data_dir / "store.sqlite3"
        if not path.exists():
            return []
        try:
            with closing(sqlite3.connect(path, timeout=5)) as db:
                return db.execute("SELECT device_id, seq, ts, received_at, data FROM messages").fetchall()
        except sqlite3.OperationalError:  # schema not created yet
            return []

    def count(self) -> int:
        return len(self.rows())

    def wait_stored(self, n: int, timeout: float = 30.0) -> None:
        try:
            wait_until(lambda: self.count() >= n, timeout, interval=0.05, what=f"{n} stored records")
        except AssertionError as exc:
            logs = {name: self.processes.log(name)[-3000:] for name in ("publisher", "store")}
            raise AssertionError(f"{exc} (have {self.count()}); logs: {logs}") from None

    def assert_exactly(self, n: int) -> None:
        rows = self.rows()
        keys = [(r[0], r[1]) for r in rows]
        assert len(keys) == len(set(keys)) == n, f"{len(keys)} rows, {len(set(keys))} distinct, want {n}"
        assert sorted(r[1] for r in rows) == list(range(n)), "a seq is missing"
        for device_id, seq, ts, received_at, data in rows:
            assert device_id == f"dev{seq % DEVICES}"
            assert ts == (None if seq % 2 else 1000.0 + seq)
            assert received_at == 1_700_000_000.0 + seq
            assert json.loads(data) == {"i": seq, "s": "é" * (seq % 3)}

    def metric(self, name: str, port_var: str) -> float:
        url = f"http://127.0.0.1:{self.env[port_var]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not in {url}")

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()


@pytest.fixture
def pipeline(data_dir: Path, processes: Processes) -> Iterator[Pipeline]:
    p = Pipeline(data_dir, processes)
    yield p
    p.close()


def make(data_dir: Path, processes: Processes, request: pytest.FixtureRequest, **env: object) -> Pipeline:
    p = Pipeline(data_dir, processes, **env)
    request.addfinalizer(p.close)
    return p


class Producer(threading.Thread):
    """Appends records ``0..n-1`` in the background, a little at a time (bounded)."""

    def __init__(self, pipeline: Pipeline, n: int, per_batch: int = 50, pause: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.pipeline, self.n, self.per_batch, self.pause = pipeline, n, per_batch, pause
        self.appended = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while self.appended < self.n:
                stop = min(self.n, self.appended + self.per_batch)
                self.pipeline.append(self.appended, stop, timeout=60)
                self.appended = stop
                time.sleep(self.pause)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def finish(self) -> None:
        self.join(90)
        assert not self.is_alive() and self.error is None, self.error


# ---------------------------------------------------------------------------- tests
def test_records_are_stored_once_with_contract_columns_and_ring_is_released(pipeline: Pipeline) -> None:
    pipeline.start("publisher")
    pipeline.start("store")
    pipeline.append(0, 3000)
    pipeline.wait_stored(3000)
    pipeline.assert_exactly(3000)
    wait_until(lambda: pipeline.ring.depth == 0, 10, what="the publisher to pop the confirmed records")
    assert pipeline.metric('iotnode_messages_total{stage="stored"}', "NODE_METRICS_PORT_STORE") == 3000
    assert pipeline.metric('iotnode_messages_total{stage="published"}', "NODE_METRICS_PORT_PUBLISHER") >= 3000
    assert pipeline.metric('iotnode_ring_depth{ring="fanin"}', "NODE_METRICS_PORT_PUBLISHER") == 0


def test_store_sigkilled_mid_stream_and_restarted_stores_every_record_exactly_once(
    pipeline: Pipeline,
) -> None:
    pipeline.start("publisher")
    pipeline.start("store")
    producer = Producer(pipeline, 6000, per_batch=20, pause=0.005)  # ~1.5 s: the kill lands mid-stream
    producer.start()
    pipeline.wait_stored(1500)
    pipeline.processes.kill("store", signal.SIGKILL)
    stored_at_kill = pipeline.count()
    time.sleep(0.3)  # records keep arriving in the ring meanwhile
    pipeline.start("store")
    producer.finish()
    pipeline.wait_stored(6000)
    assert stored_at_kill < 6000
    pipeline.assert_exactly(6000)
    wait_until(lambda: pipeline.ring.depth == 0, 10, what="the ring to drain")


def test_publisher_sigkilled_mid_stream_and_restarted_loses_and_duplicates_nothing(
    pipeline: Pipeline,
) -> None:
    pipeline.start("publisher")
    pipeline.start("store")
    producer = Producer(pipeline, 6000, per_batch=20, pause=0.005)
    producer.start()
    pipeline.wait_stored(1500)
    pipeline.processes.kill("publisher", signal.SIGKILL)
    # The killed publisher leaves its ipc:// socket files behind; the restart binds anyway.
    assert (pipeline.data_dir / "pub.sock").exists() and (pipeline.data_dir / "replay.sock").exists()
    time.sleep(0.3)
    pipeline.start("publisher")
    producer.finish()
    pipeline.wait_stored(6000)
    pipeline.assert_exactly(6000)
    wait_until(lambda: pipeline.ring.depth == 0, 10, what="the ring to drain")
    assert "publisher: fan-in ring" in pipeline.processes.log("publisher")


def test_store_pulls_a_burst_in_batches_and_confirms_each_commit(
    data_dir: Path, processes: Processes, request: pytest.FixtureRequest
) -> None:
    # A PUB high-water mark of 1 does not matter: the store pulls with FETCH, not from PUB.
    pipeline = make(data_dir, processes, request, NODE_PUB_HWM=1)
    pipeline.start("publisher")
    pipeline.start("store")
    pipeline.append(0, 1)
    pipeline.wait_stored(1)
    pipeline.append(1, 20000)  # a burst
    pipeline.wait_stored(20000, timeout=60)
    pipeline.assert_exactly(20000)
    wait_until(lambda: pipeline.ring.depth == 0, 10, what="the ring to be popped after the confirms")
    commits = pipeline.metric("iotnode_store_commit_seconds_count", "NODE_METRICS_PORT_STORE")
    assert 2 <= commits <= 20000 / 20, f"{commits} commits for 20000 records: not batched"
    assert pipeline.metric("iotnode_store_gaps_total", "NODE_METRICS_PORT_STORE") == 0


class Replay:
    """A raw DEALER on the publisher's replay endpoint (the test plays a durable subscriber)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"ipc://{pipeline.data_dir.resolve()}/replay.sock")

    def fetch(self, ring: bytes, start: int, count: int, wait: bool = True) -> None:
        self.sock.send_multipart(wire.encode_fetch(ring, start, count, wait=wait))

    def answer(self, timeout: float) -> tuple[wire.Records | None, float]:
        """The next RECORDS answer within ``timeout`` s (None) and how long it took."""
        started = time.monotonic()
        if not self.sock.poll(int(timeout * 1000)):
            return None, time.monotonic() - started
        return wire.decode_records(self.sock.recv_multipart()), time.monotonic() - started

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def test_long_poll_fetch_is_parked_until_records_arrive_then_answered_at_once(pipeline: Pipeline) -> None:
    pipeline.start("publisher")  # no store: the test is the only durable subscriber
    pipeline.append(0, 10)
    replay = Replay(pipeline)
    try:
        ring_id = pipeline.ring.incarnation
        replay.fetch(ring_id, 0, 100)
        first, _ = replay.answer(10)
        assert first is not None and len(first.records) == 10  # records exist: answered at once
        replay.fetch(ring_id, first.next, 100)
        parked, waited = replay.answer(0.25)
        assert parked is None, "a FETCH at the tail was answered before any record arrived"
        pipeline.append(10, 13)
        answer, waited = replay.answer(5)
        assert answer is not None and answer.ask == answer.start == first.next
        assert [unpack_record(r).seq for r in answer.records] == [10, 11, 12]
        assert waited < 1.0, f"parked FETCH answered {waited:.2f}s after the records were committed"
        # Nothing more arrives: the long poll ends with an empty answer after a bounded time.
        replay.fetch(ring_id, answer.next, 100)
        empty, waited = replay.answer(PARK_TIMEOUT + 3.0)  # due at PARK_TIMEOUT: not a 5 s wait
        assert empty is not None and empty.records == [] and empty.next == answer.next
        assert PARK_TIMEOUT - 0.3 < waited < PARK_TIMEOUT + 2.0
        # Without "wait" an empty answer comes at once (a tool's poll, the old behaviour).
        replay.fetch(ring_id, answer.next, 100, wait=False)
        empty, waited = replay.answer(5)
        assert empty is not None and empty.records == [] and waited < 0.3
    finally:
        replay.close()


def test_stopped_store_keeps_the_ring_full_until_it_returns_then_everything_drains_once(
    data_dir: Path, processes: Processes, request: pytest.FixtureRequest
) -> None:
    pipeline = make(data_dir, processes, request, NODE_FANIN_RING_BYTES=1 << 20)
    pipeline.start("publisher")
    pipeline.start("store")
    pipeline.append(0, 500)
    pipeline.wait_stored(500)
    processes.kill("store", signal.SIGTERM, group=False)
    assert processes.procs["store"].returncode == 0
    # Fill the ring: the publisher publishes but must not pop without the store's confirm.
    appended = 500
    for _ in range(10_000):
        n = pipeline.ring.append_batch([envelope(j) for j in range(appended, appended + 100)])
        appended += n
        if n == 0:
            break
    assert pipeline.ring.append_batch([envelope(appended)]) == 0, "the ring never filled"
    head = pipeline.ring.head
    time.sleep(1.0)
    assert pipeline.ring.head == head and pipeline.ring.append_batch([envelope(appended)]) == 0
    assert pipeline.count() == 500
    pipeline.start("store")
    pipeline.wait_stored(appended, timeout=60)
    pipeline.assert_exactly(appended)
    wait_until(lambda: pipeline.ring.depth == 0, 10, what="the ring to drain")
    assert pipeline.ring.append_batch([envelope(appended)]) == 1


def test_a_durable_subscriber_that_never_confirms_keeps_records_in_the_ring(
    data_dir: Path, processes: Processes, request: pytest.FixtureRequest
) -> None:
    pipeline = make(data_dir, processes, request, NODE_DURABLE_SUBSCRIBERS="store,audit")
    pipeline.start("publisher")
    pipeline.start("store")
    pipeline.append(0, 1000)
    pipeline.wait_stored(1000)
    time.sleep(1.2)  # more than a confirm interval of the store
    assert pipeline.ring.depth == 1000 and pipeline.ring.head == 0
    # Now "audit" confirms over the replay socket: the ring is released up to it.
    tail = pipeline.ring.tail
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as dealer:
        dealer.setsockopt(zmq.LINGER, 1000)
        dealer.connect(f"ipc://{data_dir.resolve()}/replay.sock")
        dealer.send_multipart(wire.encode_confirm("audit", pipeline.ring.incarnation, tail))
        wait_until(lambda: pipeline.ring.depth == 0, 10, what="the ring to be popped after audit confirmed")
    assert pipeline.ring.head == tail


def test_fetch_below_the_head_is_answered_from_the_head_and_a_probe_learns_the_ring(
    pipeline: Pipeline,
) -> None:
    pipeline.start("publisher")
    pipeline.start("store")
    pipeline.append(0, 200)
    pipeline.wait_stored(200)
    wait_until(lambda: pipeline.ring.head > 0, 10, what="a pop")
    pipeline.processes.kill("store", signal.SIGTERM, group=False)
    pipeline.append(200, 210)  # unconfirmed: they stay in the ring
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as dealer:
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVTIMEO, 5000)
        dealer.connect(f"ipc://{pipeline.data_dir.resolve()}/replay.sock")
        dealer.send_multipart(wire.encode_fetch(b"", 0, 0))
        probe = wire.decode_records(dealer.recv_multipart())
        assert probe.ring == pipeline.ring.incarnation and probe.items == []
        head = pipeline.ring.head
        dealer.send_multipart(wire.encode_fetch(pipeline.ring.incarnation, 0, 5))
        answer = wire.decode_records(dealer.recv_multipart())
        # Confused requests (not a record boundary, far beyond the tail) get an empty answer.
        for bad_from in (head + 7, pipeline.ring.tail + (1 << 30)):
            dealer.send_multipart(wire.encode_fetch(pipeline.ring.incarnation, bad_from, 5))
            assert wire.decode_records(dealer.recv_multipart()).items == []
        dealer.send_multipart([b"NONSENSE", b"\xc1"])
        dealer.send_multipart(wire.encode_fetch(pipeline.ring.incarnation, head, 1))
        assert len(wire.decode_records(dealer.recv_multipart()).items) == 1
    assert processes_alive(pipeline, "publisher")
    assert answer.start == head > 0 and answer.ask == 0
    assert len(answer.items) == 5
    assert answer.items[0].pos == head and answer.next == answer.items[-1].end < answer.tail
    assert [unpack_record(item.record).seq for item in answer.items] == [200, 201, 202, 203, 204]


def test_recreated_fanin_ring_is_followed_from_its_head(pipeline: Pipeline) -> None:
    pipeline.start("publisher")
    pipeline.start("store")
    pipeline.append(0, 300)
    pipeline.wait_stored(300)
    pipeline.processes.kill("publisher", signal.SIGTERM, group=False)
    pipeline.close()
    pipeline._ring = None
    for suffix in ("", ".lock", ".consumer"):
        path = pipeline.data_dir / f"fanin.ring{suffix}"
        if path.exists():
            path.unlink()
    pipeline.start("publisher")
    pipeline.append(300, 600)
    pipeline.wait_stored(600)
    pipeline.assert_exactly(600)
    wait_until(
        lambda: "ring id changed" in pipeline.processes.log("store"), 10, what="the ring change to be logged"
    )


def test_bad_records_in_the_ring_are_logged_and_skipped_without_stopping_the_flow(pipeline: Pipeline) -> None:
    pipeline.start("publisher")
    pipeline.start("store")
    pipeline.append(0, 10)
    assert (
        pipeline.ring.append_batch([b"\xc1 not msgpack", pack_record("dev-bytes", 1, None, 1.0, b"\x00")])
        == 2
    )
    pipeline.append(10, 20)
    pipeline.wait_stored(20)
    wait_until(lambda: pipeline.ring.depth == 0, 10, what="the ring to drain past the bad records")
    pipeline.assert_exactly(20)
    log = pipeline.processes.log("store")
    assert "undecodable record envelope" in log and "dev-bytes" in log
    assert processes_alive(pipeline, "publisher", "store")


def processes_alive(pipeline: Pipeline, *names: str) -> bool:
    return all(pipeline.processes.procs[name].poll() is None for name in names)


def test_sigterm_stops_both_stages_with_status_zero(pipeline: Pipeline) -> None:
    pipeline.start("publisher")
    pipeline.start("store")
    pipeline.append(0, 100)
    pipeline.wait_stored(100)
    for name in ("store", "publisher"):
        started = time.monotonic()
        pipeline.processes.kill(name, signal.SIGTERM, group=False)
        assert pipeline.processes.procs[name].returncode == 0, pipeline.processes.log(name)
        assert time.monotonic() - started < 5
    assert "stopped" in pipeline.processes.log("store") and "stopped" in pipeline.processes.log("publisher")


@pytest.mark.parametrize(
    ("name", "var", "value"),
    [
        ("publisher", "NODE_PUB_HWM", "lots"),
        ("store", "NODE_PUB_HWM", "0"),
        ("publisher", "NODE_DURABLE_SUBSCRIBERS", "store,,audit"),
        ("store", "NODE_PUB_BIND", "udp://127.0.0.1:1"),
        ("publisher", "NODE_FANIN_RING_BYTES", "3000000"),
    ],
)
def test_bad_configuration_exits_non_zero_naming_the_variable(
    data_dir: Path, processes: Processes, name: str, var: str, value: str
) -> None:
    env = node_env(data_dir, **{var: value})
    proc = processes.start(name, f"node.workers.{name}", env, data_dir.parent)
    assert proc.wait(timeout=30) != 0
    log = processes.log(name)
    assert var in log and value in log


def test_second_publisher_on_the_same_ring_exits_non_zero(pipeline: Pipeline) -> None:
    pipeline.start("publisher")
    wait_until(
        lambda: "publisher: fan-in ring" in pipeline.processes.log("publisher"), 15, what="publisher up"
    )
    env = dict(pipeline.env, NODE_METRICS_PORT_PUBLISHER=str(free_port()))
    second = pipeline.processes.start("publisher2", "node.workers.publisher", env, pipeline.data_dir.parent)
    assert second.wait(timeout=30) == 1
    assert "cannot consume the fan-in ring" in pipeline.processes.log("publisher2")
    assert pipeline.processes.procs["publisher"].poll() is None


@pytest.mark.parametrize("records", [10, 0], ids=["after-records", "fresh-node"])
def test_idle_stages_do_not_spin(pipeline: Pipeline, records: int) -> None:
    """A fresh node too: its store has no cursor to confirm yet (it once spun there)."""
    pipeline.start("publisher")
    pipeline.start("store")
    if records:
        pipeline.append(0, records)
        pipeline.wait_stored(records)
    else:
        wait_until(lambda: "fetching from replay" in pipeline.processes.log("store"), 15, what="the store")
        time.sleep(0.5)

    def cpu(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    pids = [pipeline.processes.procs[n].pid for n in ("publisher", "store")]
    before = [cpu(p) for p in pids]
    woke_before = [wake_ups(p) for p in pids]
    time.sleep(3.0)
    used = sum(cpu(p) - b for p, b in zip(pids, before, strict=True))
    woke = {n: wake_ups(p) - b for n, p, b in zip(("publisher", "store"), pids, woke_before, strict=True)}
    assert used < 0.1, f"idle publisher + store used {used:.3f} s of CPU in 3 s"
    # Every thread counted (libzmq's I/O threads too: ZMTP heartbeats every 2 s per
    # link).  Before issue 16 the two woke 67-84 times in 3 s (heartbeats and long polls
    # every 0.5 s, confirms every 1 s, the /metrics threads' 0.5 s polls); now 4-8.
    assert sum(woke.values()) <= 25, f"idle publisher + store woke {woke} times in 3 s"


def wake_ups(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid`` so far (a wake-up each)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread ended
        total += int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return total


def test_a_restarted_publisher_gets_the_stores_fetch_at_once_not_after_its_timeout(
    pipeline: Pipeline,
) -> None:
    """The store resends its long poll (and its cursor) when the connection's handshake
    succeeds again: the first records after the restart are stored well before
    FETCH_TIMEOUT (8 s), which only covers a request lost without a disconnection."""
    pipeline.start("publisher")
    pipeline.start("store")
    pipeline.append(0, 10)
    pipeline.wait_stored(10)
    pipeline.processes.kill("publisher", signal.SIGKILL)
    time.sleep(0.3)
    pipeline.start("publisher")
    wait_until(
        lambda: "connected to the publisher again" in pipeline.processes.log("store"), 15, what="reconnection"
    )
    t0 = time.monotonic()
    pipeline.append(10, 20)
    pipeline.wait_stored(20, timeout=FETCH_TIMEOUT)
    took = time.monotonic() - t0
    assert took < 2.0, f"records after the publisher's restart were stored {took:.2f} s after appending"
    pipeline.assert_exactly(20)
    wait_until(
        lambda: pipeline.ring.depth == 0, 10, what="the restarted publisher to pop (it got the CONFIRM)"
    )


def test_the_first_record_after_a_quiet_spell_is_stored_at_once(pipeline: Pipeline) -> None:
    """Longer than a long poll (PARK_TIMEOUT) of silence, then one record: the parked
    FETCH is answered when the doorbell rings, not at the next poll."""
    pipeline.start("publisher")
    pipeline.start("store")
    pipeline.append(0, 1)
    pipeline.wait_stored(1)
    time.sleep(PARK_TIMEOUT + 1.0)
    t0 = time.monotonic()
    pipeline.append(1, 2)
    pipeline.wait_stored(2, timeout=10)
    took = time.monotonic() - t0
    assert took < 0.5, f"the first record after {PARK_TIMEOUT + 1:.0f} s of silence took {took:.2f} s"


def test_repeated_sigkills_of_both_stages_still_store_every_record_exactly_once(pipeline: Pipeline) -> None:
    pipeline.start("publisher")
    pipeline.start("store")
    producer = Producer(pipeline, 10000, per_batch=40, pause=0.003)
    producer.start()
    for round_, name in enumerate(("store", "publisher", "store", "publisher", "store")):
        pipeline.wait_stored(min(9000, 1000 * (round_ + 1)), timeout=60)
        pipeline.processes.kill(name, signal.SIGKILL)
        time.sleep(0.1)
        pipeline.start(name)
    producer.finish()
    pipeline.wait_stored(10000, timeout=60)
    pipeline.assert_exactly(10000)
    wait_until(lambda: pipeline.ring.depth == 0, 10, what="the ring to drain")


def test_records_across_several_ring_wraps_with_padding_are_stored_exactly_once(
    data_dir: Path, processes: Processes, request: pytest.FixtureRequest
) -> None:
    pipeline = make(data_dir, processes, request, NODE_FANIN_RING_BYTES=1 << 20)
    pipeline.start("publisher")
    pipeline.start("store")
    n = 30000  # about 3 MiB of records through a 1 MiB ring
    pipeline.append(0, n, timeout=60)
    pipeline.wait_stored(n, timeout=60)
    pipeline.assert_exactly(n)
    assert pipeline.ring.head > 2 * pipeline.ring.capacity  # wrapped at least twice
    wait_until(lambda: pipeline.ring.depth == 0, 10, what="the ring to drain")
    assert "released before the store had them" not in processes.log("store")  # padding is not a gap


def test_ring_wraps_with_padding_while_a_live_subscriber_listens_keep_the_publisher_streaming(
    data_dir: Path, processes: Processes, request: pytest.FixtureRequest
) -> None:
    """Regression: with a live subscriber the ring is popped only to the live position;
    when that sits right before wrap padding the ring's head moves past the padding,
    and the publisher once read from below the head and crashed (RingPositionError)."""
    pipeline = make(data_dir, processes, request, NODE_FANIN_RING_BYTES=1 << 20)
    pipeline.start("publisher")
    pipeline.start("store")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 0)  # the test never loses live messages on its side
    sub.setsockopt(zmq.SUBSCRIBE, b"")  # every device, as the fanout does for device=*
    sub.connect(f"ipc://{data_dir.resolve()}/pub.sock")
    received = [0]
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            if sub.poll(100) and sub.recv_multipart()[0] != wire.HEARTBEAT_TOPIC:
                received[0] += 1

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        wait_until(
            lambda: "live subscriber subscribed" in processes.log("publisher"), 10, what="the subscription"
        )
        n = 30000  # about 3 MiB of records through a 1 MiB ring
        producer = Producer(pipeline, n, per_batch=200)
        producer.start()
        producer.finish()
        pipeline.wait_stored(n, timeout=60)
        pipeline.assert_exactly(n)
        assert pipeline.ring.head > 2 * pipeline.ring.capacity  # wrapped at least twice
        assert "Traceback" not in processes.log("publisher"), processes.log("publisher")[-3000:]
        wait_until(lambda: received[0] > 0, 10, what="live records")
    finally:
        stop.set()
        reader.join(5)
        sub.close(linger=0)
        ctx.term()


def test_a_caught_up_store_counts_no_gap_when_wrap_padding_is_released_after_its_cursor(
    data_dir: Path, processes: Processes, request: pytest.FixtureRequest
) -> None:
    """Issue 12: wrap padding after the store's cursor C can be released (the live
    stream reads through it and pops it) before the store's next FETCH from C is
    answered; that answer starts past the padding.  Only padding was released, so
    ``iotnode_store_gaps_total`` -- the metric that means loss -- must stay 0."""
    pipeline = make(data_dir, processes, request, NODE_FANIN_RING_BYTES=1 << 20)
    pipeline.start("publisher")
    pipeline.start("store")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")  # a live subscriber: the publisher streams every record
    sub.connect(f"ipc://{data_dir.resolve()}/pub.sock")
    rng = random.Random(12)
    n = padded = 0
    try:
        wait_until(
            lambda: "live subscriber subscribed" in processes.log("publisher"), 10, what="the subscription"
        )
        for _ in range(400):  # bounded: ~12 wraps of trickled ~64 KiB records, each wrap padded
            if pipeline.ring.head > 12 * pipeline.ring.capacity:
                break
            data = {"i": n, "pad": "x" * rng.randint(40_000, 90_000)}
            big = pack_record(f"dev{n % DEVICES}", n, None, 1_700_000_000.0 + n, data)
            left = pipeline.ring.capacity - pipeline.ring.tail % pipeline.ring.capacity
            padded += left < len(big) + 32
            wait_until(lambda: pipeline.ring.append_batch([big]) == 1, 20, what="room")  # noqa: B023
            n += 1
            pipeline.wait_stored(n, timeout=20)  # caught up: its next FETCH waits at its cursor
            while sub.poll(0):
                sub.recv_multipart()
        assert padded >= 8, f"only {padded} wraps with padding"
        wait_until(lambda: pipeline.ring.depth == 0, 10, what="the ring to drain")
        assert pipeline.metric("iotnode_store_gaps_total", "NODE_METRICS_PORT_STORE") == 0
        assert "released before the store had them" not in processes.log("store")
    finally:
        sub.close(linger=0)
        ctx.term()


def test_a_fetch_from_the_cursor_before_released_wrap_padding_is_answered_from_the_cursor(
    data_dir: Path, processes: Processes, request: pytest.FixtureRequest
) -> None:
    """Issue 12, made deterministic: the store's cursor C sits right before wrap padding
    whose next record is still claimed (a stopped producer), the publisher's read of the
    parked FETCH(C) scans through the padding, and CONFIRM(C) pops past it.  The answer,
    once the record is settled, must start at C: only padding lies between C and the
    head, and a later start is what the store counts as records lost
    (``iotnode_store_gaps_total``)."""
    pipeline = make(data_dir, processes, request, NODE_FANIN_RING_BYTES=1 << 20)
    pipeline.start("publisher")  # no store: the test is the durable subscriber "store"
    ring = pipeline.ring
    cap = ring.capacity
    big = b"b" * ring.max_record  # a record of cap/4 bytes with its header
    assert ring.append_batch([big, big, big, b"c" * (ring.max_record - 32)]) == 4
    cursor = ring.tail
    assert cursor == cap - 32  # 32 bytes left before the wrap: the next record pads them
    replay = Replay(pipeline)
    ready = data_dir / "claimed"
    claimer: subprocess.Popen[bytes] | None = None
    try:
        inc = ring.incarnation
        replay.fetch(inc, 0, 100)
        first, _ = replay.answer(10)
        assert first is not None and first.next == cursor and len(first.records) == 4
        replay.sock.send_multipart(wire.encode_confirm("store", inc, first.ends[0]))  # room for the claim
        wait_until(lambda: ring.head == first.ends[0], 10, what="the first record popped")
        worker = [
            "-m",
            "tests.ring._workers",
            "claimer",
            str(data_dir / "fanin.ring"),
            "auto",
            "1",
            str(ready),
        ]
        claimer = subprocess.Popen([sys.executable, *worker], env=pipeline.env)
        wait_until(ready.exists, 15, what="the claim after the padding")
        replay.fetch(inc, cursor, 100)  # parked: the publisher's read passes the padding, stops at the claim
        parked, _ = replay.answer(0.3)
        assert parked is None
        replay.sock.send_multipart(wire.encode_confirm("store", inc, cursor))
        wait_until(lambda: ring.head > cursor, 10, what="the pop to the cursor and the padding after it")
        assert ring.head == cap
        claimer.kill()  # the claim is settled (its checksum holds): delivered
        claimer.wait(10)
        answer, _ = replay.answer(10)
        assert answer is not None and answer.ask == cursor
        assert answer.start == cursor, f"answered from {answer.start}: the store would count a gap"
        assert len(answer.records) == 1 and answer.ends == [answer.next]
    finally:
        if claimer is not None and claimer.poll() is None:
            claimer.kill()
            claimer.wait(10)
        replay.close()


def test_a_corrupt_record_met_serving_a_fetch_stops_the_publisher_so_a_restart_recovers_it(
    pipeline: Pipeline,
) -> None:
    """Issue 12: RingCorrupt while answering a FETCH is not a confused peer: the publisher
    exits non-zero (logged), and the next start recovers the ring and serves again."""
    pipeline.start("publisher")  # no store: the test is the durable subscriber
    ring = pipeline.ring
    assert ring.append_batch([envelope(i) for i in range(3)]) == 3
    replay = Replay(pipeline)
    try:
        replay.fetch(ring.incarnation, 0, 1, wait=False)
        first, _ = replay.answer(10)
        assert first is not None and len(first.records) == 1
        second = first.next  # the second record's header: smash it
        with open(pipeline.data_dir / "fanin.ring", "r+b") as fh:
            fh.seek(4096 + second)
            fh.write(b"\xff" * 32)
        replay.fetch(ring.incarnation, second, 10, wait=False)
        proc = pipeline.processes.procs["publisher"]
        assert proc.wait(20) == 1
        log = pipeline.processes.log("publisher")
        assert "failed" in log and "no valid record header" in log and "Traceback" not in log
    finally:
        replay.close()
    pipeline.close()  # the test's own mapping: the restarted publisher must be alone to recover
    pipeline._ring = None
    pipeline.start("publisher")
    ring = pipeline.ring
    assert ring.append_batch([envelope(9)]) == 1
    replay = Replay(pipeline)
    try:
        replay.fetch(ring.incarnation, 0, 100, wait=False)
        answer, _ = replay.answer(10)
        # recovery padded the smashed record only: the records around it are kept
        assert answer is not None and [unpack_record(r).seq for r in answer.records] == [0, 2, 9]
    finally:
        replay.close()
