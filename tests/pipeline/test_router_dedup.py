"""The router's per-source dedup and pending appends, the monitor's ack window (no processes)."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest

from node import wire
from node.pipeline.monitor import Window
from node.pipeline.router import Pending, Sources, append_pending
from node.ring import Ring

SRC = b"s" * 16


def batch(start: int, positions: list[int], end: int, base: int) -> wire.Batch:
    records = [f"r{p}".encode() for p in positions]
    return wire.decode_batch(wire.encode_batch(SRC, positions, end, records, start=start, base=base))


def test_fresh_router_appends_the_oldest_unacked_batch_whole() -> None:
    sources = Sources()
    assert sources.accept(batch(64, [64, 96], 128, base=64)) == [b"r64", b"r96"]
    assert sources.known(SRC) == 128


def test_resent_batch_appends_only_records_not_yet_appended() -> None:
    sources = Sources()
    sources.accept(batch(0, [0, 32], 64, base=0))
    assert sources.accept(batch(0, [0, 32, 64, 96], 128, base=0)) == [b"r64", b"r96"]
    assert sources.accept(batch(0, [0, 32, 64, 96], 128, base=0)) == []
    assert sources.known(SRC) == 128


def test_batch_after_a_lost_one_is_refused_until_the_hole_is_resent() -> None:
    sources = Sources()
    sources.accept(batch(0, [0], 32, base=0))
    assert sources.accept(batch(64, [64], 96, base=0)) is None  # [32, 64) never arrived
    assert sources.accept(batch(32, [32], 64, base=0)) == [b"r32"]
    assert sources.accept(batch(64, [64], 96, base=0)) == [b"r64"]


def test_restarted_router_refuses_a_later_batch_that_overtook_the_oldest_resend() -> None:
    # The monitor was acked through 100; its batches [100, 200) and [200, 300) are in
    # flight and the second reaches a freshly started router first.
    sources = Sources()
    assert sources.accept(batch(200, [200], 300, base=100)) is None
    assert sources.accept(batch(100, [100], 200, base=100)) == [b"r100"]
    assert sources.accept(batch(200, [200], 300, base=100)) == [b"r200"]


def test_padding_before_the_first_record_is_not_a_hole() -> None:
    sources = Sources()
    sources.accept(batch(0, [0], 4000, base=0))
    assert sources.accept(batch(4000, [4096], 4128, base=0)) == [b"r4096"]  # padding at the wrap point


def test_sources_are_tracked_per_ring() -> None:
    sources = Sources()
    other = b"o" * 16
    sources.accept(batch(0, [0], 32, base=0))
    frames = wire.encode_batch(other, [0], 32, [b"x"], start=0, base=0)
    assert sources.accept(wire.decode_batch(frames)) == [b"x"]
    assert len(sources) == 2


def test_full_ring_appends_a_prefix_and_keeps_the_rest_pending(tmp_path: Path) -> None:
    ring = Ring.open(tmp_path / "fanin.ring", capacity=4096, durability="process")
    big = b"x" * 900  # 960 bytes in the ring: four fit in 4096, five do not
    pending = deque([Pending(b"id", SRC, 10, [big] * 3), Pending(b"id", SRC, 20, [big] * 2)])
    appended, done = append_pending(ring, pending)
    assert appended == 4
    assert [e.end for e in done] == [10]  # the second batch is not acked yet
    assert [len(e.records) for e in pending] == [1]
    assert append_pending(ring, pending) == (0, [])  # still full: nothing, nothing acked
    reader = ring.reader()
    records = reader.read(ring.head, max_records=10)
    reader.pop(records[-1].end)
    appended2, done2 = append_pending(ring, pending)
    assert appended2 == 1 and [e.end for e in done2] == [20] and not pending
    ring.close()


def test_window_pops_through_the_highest_ack_and_refuses_foreign_acks() -> None:
    window = Window(SRC, base=0, size=3)
    window.add([0, 32], 64, [b"a", b"b"])
    window.add([64], 96, [b"c"])
    window.add([128], 160, [b"d"])  # padding at [96, 128)
    assert window.full
    assert window.ack(wire.Ack(SRC, 96)) == 3
    assert window.base == 96 and len(window.flights) == 1
    assert window.ack(wire.Ack(SRC, 64)) == 0  # a stale duplicate ack
    assert window.base == 96
    window.add([160], 192, [b"e"])
    with pytest.raises(wire.WireError, match="not the end of a batch"):
        window.ack(wire.Ack(SRC, 176))
    with pytest.raises(wire.WireError, match="beyond what was sent"):
        window.ack(wire.Ack(SRC, 4096))
    with pytest.raises(wire.WireError, match="expected"):
        window.ack(wire.Ack(b"x" * 16, 192))


def test_window_resends_carry_the_current_base() -> None:
    window = Window(SRC, base=0)
    first = window.add([0], 32, [b"a"])
    second = window.add([32], 64, [b"b"])
    assert wire.decode_batch(window.frames(second)).base == 0
    window.ack(wire.Ack(SRC, 32))
    assert first not in window.flights
    resent = wire.decode_batch(window.frames(second))
    assert (resent.start, resent.base) == (32, 32)


def test_window_follows_a_head_moved_past_padding_only_when_nothing_is_in_flight() -> None:
    window = Window(SRC, base=0)
    window.add([0], 32, [b"a"])
    window.skip_to(96)
    assert (window.read_pos, window.base) == (32, 0)  # a batch in flight: untouched
    window.ack(wire.Ack(SRC, 32))
    window.skip_to(96)  # padding [32, 96) released by the ring
    assert (window.read_pos, window.base) == (96, 96)
    flight = window.add([96], 128, [b"b"])
    assert wire.decode_batch(window.frames(flight))[4:] == (96, 96)
