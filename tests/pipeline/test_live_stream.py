"""The publisher's live stream (XPUB) serves live subscribers only: a real publisher
process, a real fan-in ring, and the test's own SUB socket as the live subscriber."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from node import wire
from node.record import pack_record, unpack_record
from node.ring import Ring
from tests.support import Processes, node_env, wait_until

TIMEOUT = 10.0


class LiveNode:
    """A publisher on a private data dir; the test appends to its fan-in ring."""

    def __init__(self, data_dir: Path, processes: Processes, **env: object) -> None:
        self.processes = processes
        self.env = node_env(data_dir, **env)
        processes.start("publisher", "node.workers.publisher", self.env, data_dir.parent)
        path = data_dir / "fanin.ring"
        wait_until(path.exists, 15, what="the publisher to create the fan-in ring")
        self.ring = Ring.open(path, capacity=int(self.env["NODE_FANIN_RING_BYTES"]), durability="process")
        self.seq: dict[str, int] = {}
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(f"ipc://{data_dir.resolve()}/pub.sock")

    def append(self, *devices: str) -> None:
        payloads = []
        for device in devices:
            seq = self.seq.get(device, 0)
            self.seq[device] = seq + 1
            payloads.append(pack_record(device, seq, None, 1.0, seq))
        assert self.ring.append_batch(payloads) == len(payloads)

    def log_count(self, text: str) -> int:
        return self.processes.log("publisher").count(text)

    def receive(self, timeout: float = TIMEOUT) -> wire.Published | None:
        """The next published record (heartbeats skipped), or None within ``timeout``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sub.poll(int(left * 1000)):
                return None
            frames = self.sub.recv_multipart()
            if frames[0] != wire.HEARTBEAT_TOPIC:
                return wire.decode_published(frames)
        return None

    def until_live(self, device: str) -> list[wire.Published]:
        """Append a record of ``device`` every 50 ms until records arrive (the subscription
        is in); every record received, the last one a quiet 0.3 s later."""
        for _ in range(100):
            self.append(device)
            got = self.receive(0.05)
            if got is not None:
                received = [got]
                while (more := self.receive(0.3)) is not None:
                    received.append(more)
                return received
        raise AssertionError(f"no record of {device} was published to the test's subscription")

    def close(self) -> None:
        self.sub.close(linger=0)
        self.ctx.term()
        self.ring.close()


@pytest.fixture
def live(data_dir: Path, processes: Processes) -> Iterator[LiveNode]:
    node = LiveNode(data_dir, processes)
    yield node
    node.close()


def test_xpub_publishes_nothing_while_unsubscribed_and_a_topic_again_after_a_subscribe(
    live: LiveNode,
) -> None:
    topic = wire.device_topic("dev3")
    for _ in range(10):  # 30 records nobody listens to
        live.append("dev1", "dev3", "dev33")
    live.sub.setsockopt(zmq.SUBSCRIBE, topic)
    first = live.until_live("dev3")
    # The per-topic number starts at 1: the 10 earlier dev3 records were never published.
    assert [p.n for p in first] == list(range(1, len(first) + 1))
    assert {unpack_record(p.record).device_id for p in first} == {"dev3"} and unpack_record(
        first[0].record
    ).seq >= 10
    last = first[-1].n
    live.append("dev1", "dev3", "dev33", "dev3")  # dev33 starts with "dev3" but is another topic
    got = [live.receive(), live.receive()]
    assert [(unpack_record(p.record).device_id, p.n) for p in got if p] == [
        ("dev3", last + 1),
        ("dev3", last + 2),
    ]
    assert {p.epoch for p in got if p} == {first[0].epoch}
    assert live.receive(0.3) is None  # nothing of dev1 / dev33
    last += 2

    live.sub.setsockopt(zmq.UNSUBSCRIBE, topic)
    wait_until(lambda: live.log_count("unsubscribed from b'dev3\\x00'") == 1, TIMEOUT, what="the unsubscribe")
    for _ in range(10):
        live.append("dev3")
    unheard = live.seq["dev3"]  # seqs below this were appended while nobody listened
    time.sleep(0.3)  # the publisher reads past them: it must not count them as published
    live.sub.setsockopt(zmq.SUBSCRIBE, topic)
    wait_until(lambda: live.log_count("subscribed to b'dev3\\x00'") == 2, TIMEOUT, what="the resubscribe")
    again = live.until_live("dev3")
    # Numbering goes on from where it stopped: nothing was sent on the topic meanwhile.
    assert again[0].n == last + 1 and again[0].epoch == first[0].epoch
    assert unpack_record(again[0].record).seq >= unheard  # live records, not the unheard ones


def test_empty_prefix_follows_every_device_and_heartbeats_keep_coming(
    data_dir: Path, processes: Processes
) -> None:
    live = LiveNode(data_dir, processes, NODE_PUB_HEARTBEAT_MS=300)  # default 5 s: too slow to wait for
    try:
        _follow_everything_and_count_heartbeats(live)
    finally:
        live.close()


def _follow_everything_and_count_heartbeats(live: LiveNode) -> None:
    live.sub.setsockopt(zmq.SUBSCRIBE, b"")  # what the fanout does for device=*
    n = live.until_live("a")[-1].n
    live.append("b", "c", "a")
    got = [live.receive() for _ in range(3)]
    assert [(unpack_record(p.record).device_id, p.n) for p in got if p] == [("b", 1), ("c", 1), ("a", n + 1)]
    assert [p.pos for p in got[1:] if p] == [p.end for p in got[:-1] if p]  # spans chain in ring order
    beats = 0
    deadline = time.monotonic() + 3
    while beats < 2 and time.monotonic() < deadline:
        if live.sub.poll(200) and live.sub.recv_multipart()[0] == wire.HEARTBEAT_TOPIC:
            beats += 1
    assert beats == 2, "no heartbeats on the live stream"


def test_a_new_subscription_gets_a_heartbeat_at_once(live: LiveNode) -> None:
    """With the default interval (5 s), a subscriber still learns the position at once."""
    live.sub.setsockopt(zmq.SUBSCRIBE, wire.HEARTBEAT_TOPIC)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3:  # the subscription may need a moment to reach the XPUB
        if live.sub.poll(100):
            frames = live.sub.recv_multipart()
            assert wire.decode_heartbeat(frames)[0] == live.ring.incarnation
            break
    else:
        raise AssertionError("no heartbeat within 3 s of subscribing")


def test_live_position_below_the_ring_head_moves_to_the_head_instead_of_crashing(data_dir: Path) -> None:
    """Regression (seen once in CI, test_node_backpressure): the publisher died with
    ``RingPositionError: read from 1048320: below the ring head 1048576``.  A pop to the
    end of the last record before the wrap releases the padding after it too when the
    reader has already scanned past that padding (the next record was not committed
    yet), so the ring's head can land beyond the live position.  That interleaving is
    a race; here the state it leaves is made directly, on a real Publisher in this
    process and a real 1 MiB fan-in ring, and the next step must carry on."""
    from node.config import Settings
    from node.pipeline.publisher import Publisher

    settings = Settings.from_env(node_env(data_dir))
    data_dir.mkdir(parents=True, exist_ok=True)
    ring = Ring.open(settings.ring_path("fanin"), capacity=1 << 20, durability="process")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    publisher = Publisher(settings, ring, ctx)
    try:
        for i in range(20):
            assert ring.append(pack_record("dev", i, None, 1.0, i))
        records = publisher.read(ring.head, 100, 1 << 20)
        publisher.confirmed = {"store": records[10].end}
        publisher.release()  # no live subscriber yet: popped to the store's cursor
        for catching_up in (True, False):
            publisher.on_subscription(b"\x01")  # a live subscriber ("everything")
            publisher.catching_up = catching_up
            publisher.published = records[5].end  # below the head, as after the padding pop
            publisher.step()  # must not read below the head
            assert publisher.published >= ring.head
    finally:
        publisher.close()
        ctx.term()
        ring.close()


def test_a_restarted_publisher_releases_what_the_store_already_holds_without_new_traffic(
    data_dir: Path,
) -> None:
    """Regression (a CI run of test_repeated_sigkills_of_both_stages): a publisher
    restarted after the store had stored everything never read those records itself,
    so it popped nothing until new records came; with a full ring none could come
    (the router waits for room): a deadlock.  Real Publisher, real fan-in ring."""
    from node.config import Settings
    from node.pipeline.publisher import Publisher

    settings = Settings.from_env(node_env(data_dir))
    data_dir.mkdir(parents=True, exist_ok=True)
    ring = Ring.open(settings.ring_path("fanin"), capacity=1 << 20, durability="process")
    for i in range(5000):
        assert ring.append(pack_record("dev", i, None, 1.0, i))
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    publisher = Publisher(settings, ring, ctx)  # starts at the head: read nothing yet
    try:
        publisher.on_confirm(wire.Confirm("store", ring.incarnation, ring.tail))  # the store holds it all
        for _ in range(20):  # bounded: a few reads of up to 2,048 records each
            if ring.depth == 0:
                break
            publisher.step()
        assert ring.depth == 0 and ring.head == ring.tail
    finally:
        publisher.close()
        ctx.term()
        ring.close()
