"""The group committer in-process, over a real ring file (no server, no mocks)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.front.committer import Committer, Conn
from node.protocol import Ack, decode_reply
from node.record import pack_record, unpack_record
from node.ring import Ring

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ring(tmp_path: Path) -> Iterator[Ring]:
    r = Ring.open(tmp_path / "ingress.ring", capacity=1 << 20, durability="power")
    try:
        yield r
    finally:
        r.close()


def payload(device: str, seq: int, size: int = 16) -> bytes:
    return pack_record(device, seq, None, 0.0, "x" * size)


async def take_acks(conn: Conn) -> list[Ack]:
    frames = await asyncio.wait_for(conn.outgoing(), 10)
    return [decode_reply(f) for f in frames]  # type: ignore[misc]


def drain(ring: Ring) -> list:
    reader = ring.reader()
    try:
        out, pos = [], ring.head
        for _ in range(1000):
            batch = reader.read(pos, max_records=4096)
            if not batch:
                return out
            out.extend(unpack_record(r.payload) for r in batch)
            pos = batch[-1].end
            reader.pop(pos)
        return out
    finally:
        reader.close()


def test_records_queued_together_form_one_group_and_one_ack_per_connection(ring: Ring) -> None:
    groups: list[tuple[int, int]] = []

    async def go() -> tuple[list[Ack], list[Ack]]:
        committer = Committer(
            ring,
            max_pending_bytes=1 << 20,
            window=64,
            on_group=lambda now, ts, n: groups.append((len(ts), n)),
        )
        await committer.start()
        a, b = committer.connect("a"), committer.connect("b")
        for seq in range(10):  # all queued before the committer task runs
            committer.submit(a, seq, True, payload("a", seq), 0.0)
            committer.submit(b, seq, seq % 2 == 0, payload("b", seq), 0.0)
        acks = await take_acks(a), await take_acks(b)
        await committer.stop()
        assert committer.stats.groups == 1 and committer.stats.acked == 20
        return acks

    acks_a, acks_b = asyncio.run(go())
    assert acks_a == [Ack(9, True)]
    assert acks_b == [Ack(9, False)]  # seq 9 came as text: the ack is text
    assert groups == [(20, sum(len(payload(d, s)) for d in "ab" for s in range(10)))]
    records = drain(ring)
    assert [(r.device_id, r.seq) for r in records if r.device_id == "a"] == [("a", s) for s in range(10)]


def test_ack_latency_hook_sees_receive_times(ring: Ring) -> None:
    seen: list[float] = []

    async def go() -> None:
        committer = Committer(
            ring,
            max_pending_bytes=1 << 20,
            window=8,
            on_group=lambda now, ts, n: seen.extend(now - t for t in ts),
        )
        await committer.start()
        conn = committer.connect("lat")
        committer.submit(conn, 0, True, payload("lat", 0), time.perf_counter())
        await take_acks(conn)
        await committer.stop()

    asyncio.run(go())
    assert len(seen) == 1 and 0 <= seen[0] < 5


def test_resent_lower_seq_on_the_same_connection_is_not_covered_early(ring: Ring) -> None:
    """seq 5 durable, then 3 pending: an ack may not claim 'every seq <= 5 is durable'."""

    async def go() -> list[int]:
        committer = Committer(ring, max_pending_bytes=1 << 20, window=64)
        conn = committer.connect("d")
        committer.submit(conn, 5, True, payload("d", 5), 0.0)
        committer.submit(conn, 3, True, payload("d", 3), 0.0)
        # Persist only the first record, driving the committer's own steps by hand
        # (as a group of one that the ring took only half of would):
        group = committer._take()
        first, second = group
        assert ring.append_batch([first.payload]) == 1
        committer._queue.appendleft(second)
        committer._complete([first])
        acks = [a.n for a in await take_acks(conn)]  # type: ignore[union-attr]
        await committer.start()
        acks += [a.n for a in await take_acks(conn)]  # type: ignore[union-attr]
        await committer.stop()
        return acks

    assert asyncio.run(go()) == [2, 5]


def test_connection_window_blocks_the_reader_until_acks(ring: Ring) -> None:
    async def go() -> tuple[bool, bool]:
        committer = Committer(ring, max_pending_bytes=1 << 20, window=4)
        conn = committer.connect("w")
        for seq in range(4):
            committer.submit(conn, seq, True, payload("w", seq), 0.0)
        full = not committer.has_room(conn)
        waiter = asyncio.create_task(committer.wait_room(conn))
        await asyncio.sleep(0.05)
        blocked = not waiter.done()
        await committer.start()  # the group persists -> window frees
        await asyncio.wait_for(waiter, 10)
        await committer.stop()
        return full, blocked

    full, blocked = asyncio.run(go())
    assert full and blocked


def test_pending_bytes_limit_blocks_every_connection(ring: Ring) -> None:
    async def go() -> bool:
        committer = Committer(ring, max_pending_bytes=1000, window=1000)
        a, b = committer.connect("a"), committer.connect("b")
        committer.submit(a, 0, True, payload("a", 0, size=1200), 0.0)
        blocked = not committer.has_room(b)
        waiter = asyncio.create_task(committer.wait_room(b))
        await asyncio.sleep(0.02)
        assert not waiter.done()
        await committer.start()
        await asyncio.wait_for(waiter, 10)
        await committer.stop()
        return blocked

    assert asyncio.run(go())


def test_full_ring_stops_acks_until_the_consumer_pops_and_drops_nothing(ring: Ring) -> None:
    size = 8000
    total = (ring.capacity // size) * 2  # twice what fits

    async def go() -> list:
        committer = Committer(ring, max_pending_bytes=64 << 20, window=total + 1)
        await committer.start()
        conn = committer.connect("full")
        for seq in range(total):
            committer.submit(conn, seq, True, payload("full", seq, size), 0.0)
        last = -1
        for _ in range(200):  # acks stop below total while nobody pops
            try:
                acks = await asyncio.wait_for(conn.outgoing(), 0.2)
            except TimeoutError:
                break
            last = max([last, *(decode_reply(f).n for f in acks)])  # type: ignore[union-attr]
        assert 0 < last < total - 1, last
        assert committer.stats.ring_full > 0
        stalled_at = last
        consumed: list = []
        loop = asyncio.get_running_loop()
        for _ in range(200):  # the consumer pops; acks resume up to the end
            consumed += await loop.run_in_executor(None, drain, ring)
            try:
                acks = await asyncio.wait_for(conn.outgoing(), 0.2)
                last = max([last, *(decode_reply(f).n for f in acks)])  # type: ignore[union-attr]
            except TimeoutError:
                pass
            if last == total - 1:
                break
        consumed += await loop.run_in_executor(None, drain, ring)
        await committer.stop()
        assert last == total - 1 and stalled_at < last
        return consumed

    consumed = asyncio.run(go())
    assert [r.seq for r in consumed] == list(range(total))


def test_committer_refuses_nonsense_limits(ring: Ring) -> None:
    with pytest.raises(ValueError, match="got 0, 4"):
        Committer(ring, max_pending_bytes=0, window=4)


def test_inline_mode_acks_too(ring: Ring) -> None:
    async def go() -> list[Ack]:
        committer = Committer(ring, max_pending_bytes=1 << 20, window=8, threaded=False)
        await committer.start()
        conn = committer.connect("inline")
        committer.submit(conn, 7, False, payload("inline", 7), 0.0)
        acks = await take_acks(conn)
        await committer.stop()
        return acks

    assert asyncio.run(go()) == [Ack(7, False)]


def test_append_failure_fails_its_connections_without_acks(tmp_path: Path) -> None:
    """A broken ring (here: closed under the committer) is not a full ring: nothing
    is acked, the connections of the group fail (the front closes them with 1011)."""
    ring = Ring.open(tmp_path / "broken.ring", capacity=1 << 20)

    async def go() -> tuple[list, bool, bool, int]:
        committer = Committer(ring, max_pending_bytes=1 << 20, window=8)
        bad, other = committer.connect("bad"), committer.connect("other")
        ring.close()
        committer.submit(bad, 1, True, payload("bad", 1), 0.0)
        await committer.start()
        frames = await asyncio.wait_for(bad.outgoing(), 10)
        await asyncio.wait_for(committer.wait_room(bad), 10)  # returns: failed
        committer.submit(bad, 2, True, payload("bad", 2), 0.0)  # ignored
        await committer.stop()
        return frames, bad.failed, other.failed, committer.stats.pending_bytes

    frames, bad_failed, other_failed, pending = asyncio.run(go())
    assert frames == [] and bad_failed and not other_failed and pending == 0


@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("send"), st.integers(0, 30)), st.tuples(st.just("persist"), st.integers(1, 12))
        ),
        min_size=1,
        max_size=60,
    )
)
@settings(max_examples=200, deadline=None)
def test_an_ack_never_claims_a_pending_message_whatever_the_seq_order(ops: list[tuple[str, int]]) -> None:
    """Any seq order on one connection, sends interleaved with persists of any
    prefix (as a ring that takes only part of each group would): every ack N leaves
    no pending message with seq <= N, acks never decrease, and once everything is
    durable the last ack is the largest seq sent."""
    with tempfile.TemporaryDirectory() as tmp:
        ring = Ring.open(Path(tmp) / "prop.ring", capacity=1 << 20, durability="process")
        try:
            committer = Committer(ring, max_pending_bytes=1 << 30, window=1 << 20)
            conn = committer.connect("p")
            sent: list[int] = []
            done, acks = 0, []

            def persist(k: int) -> None:
                nonlocal done
                group = committer._take()
                k = min(k, len(group))
                assert ring.append_batch([e.payload for e in group[:k]]) == k
                committer._queue.extendleft(reversed(group[k:]))
                if k:
                    committer._complete(group[:k])
                done += k
                if conn._ack is not None:
                    n = conn._ack
                    assert all(seq > n for seq in sent[done:]), (n, sent[done:])
                    acks.append(n)
                    conn._ack = None

            for op, value in ops:
                if op == "send":
                    sent.append(value)
                    committer.submit(conn, value, True, payload("p", value, 1), 0.0)
                else:
                    persist(value)
            persist(len(sent))
            assert acks == sorted(acks)
            if sent:
                assert acks and acks[-1] == max(sent)
        finally:
            ring.close()


def _flowing(ring: Ring, interval: float, count: int = 60, gap: float = 0.0005) -> tuple[int, list[float]]:
    """Submit ``count`` records ``gap`` apart on one connection (records flowing, each acked
    before the next few arrive); return the committer's groups and each record's ack delay."""
    delays: list[float] = []

    async def go() -> int:
        committer = Committer(
            ring,
            max_pending_bytes=1 << 20,
            window=1024,
            interval=interval,
            on_group=lambda now, ts, n: delays.extend(now - t for t in ts),
        )
        await committer.start()
        conn = committer.connect("d")
        for seq in range(count):
            committer.submit(conn, seq, True, payload("d", seq), time.perf_counter())
            await asyncio.sleep(gap)
        for _ in range(200):
            if committer.stats.acked == count:
                break
            await asyncio.sleep(0.01)
        await committer.stop()
        assert committer.stats.acked == count
        acks = [a.n for a in [decode_reply(f) for f in conn.take()] if isinstance(a, Ack)]
        assert acks and acks[-1] == count - 1
        return committer.stats.groups

    groups = asyncio.run(go())
    assert [r.seq for r in drain(ring)] == list(range(count))
    return groups, delays


async def _time_to_ack(committer: Committer, conn: Conn, seq: int) -> float:
    """Submit record ``seq`` now; the seconds until its ack; then stop the committer."""
    t0 = time.perf_counter()
    committer.submit(conn, seq, True, payload("d", seq), t0)
    await take_acks(conn)
    took = time.perf_counter() - t0
    await committer.stop()
    return took


def test_commit_interval_makes_fewer_groups_of_flowing_records_and_delays_each_by_at_most_it(
    ring: Ring,
) -> None:
    interval = 0.02
    groups, delays = _flowing(ring, interval)
    # 60 records over >= 30 ms: without the interval about one group each (see below);
    # with 20 ms between persists, a handful.
    assert groups <= 8, groups
    assert max(delays) < interval + 0.015, max(delays)  # the wait, one persist and loop slack


def test_commit_interval_zero_persists_every_record_at_once(ring: Ring) -> None:
    groups, _ = _flowing(ring, 0.0)
    assert groups > 20, groups


def test_commit_interval_does_not_delay_a_lone_record(ring: Ring) -> None:
    async def go() -> float:
        committer = Committer(ring, max_pending_bytes=1 << 20, window=64, interval=0.05)
        await committer.start()
        conn = committer.connect("d")
        await asyncio.sleep(0.06)  # the committer has been idle longer than the interval
        return await _time_to_ack(committer, conn, 0)

    assert asyncio.run(go()) < 0.04  # well under the 50 ms interval


def test_commit_interval_is_bounded(ring: Ring) -> None:
    for bad in (-0.001, 0.2):
        with pytest.raises(ValueError, match="interval"):
            Committer(ring, max_pending_bytes=1, window=1, interval=bad)


def test_commit_interval_does_not_hold_back_the_group_after_a_large_one(ring: Ring) -> None:
    from node.front.committer import SMALL_GROUP

    async def go() -> float:
        committer = Committer(ring, max_pending_bytes=1 << 20, window=1024, interval=0.05)
        await committer.start()
        conn = committer.connect("d")
        for seq in range(SMALL_GROUP):  # queued together: one large group, persisted at once
            committer.submit(conn, seq, True, payload("d", seq), 0.0)
        await take_acks(conn)
        return await _time_to_ack(committer, conn, SMALL_GROUP)  # well within 50 ms of that persist

    assert asyncio.run(go()) < 0.03
