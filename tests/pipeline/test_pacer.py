"""Pop pacing (node/pipeline/pacer.py) on a real ring file: pops wait, but never too long."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.pipeline.pacer import POP_FILL, POP_INTERVAL, PopPacer
from node.ring import Ring

CAP = 1 << 16


def fill(ring: Ring, n: int, size: int = 100) -> list[int]:
    """Append ``n`` records; return each record's end position (what a consumer pops to)."""
    assert ring.append_batch([bytes([i % 256]) * size for i in range(n)]) == n
    reader = ring.reader()
    records = reader.read(ring.head, max_records=n, max_bytes=1 << 20)
    assert len(records) == n
    return [r.end for r in records]


def test_a_pop_waits_for_the_interval_then_happens(tmp_path: Path) -> None:
    ring = Ring.open(tmp_path / "r.ring", capacity=CAP)
    ends = fill(ring, 5)
    head0 = ring.head
    pacer = PopPacer(ring, ring.reader())
    assert not pacer.want(ends[1], now=100.0)
    assert not pacer.want(ends[3], now=100.0 + POP_INTERVAL / 2)  # the target grows, the clock does not
    assert ring.head == head0 and ring.depth == 5
    assert pacer.timeout(now=100.0 + POP_INTERVAL / 2) == pytest.approx(POP_INTERVAL / 2)
    assert pacer.poll(now=100.0 + POP_INTERVAL + 1e-6)
    assert ring.head == ends[3] and ring.depth == 1
    assert not pacer.pending and pacer.timeout() is None
    ring.close()


def test_a_filling_ring_is_popped_at_once(tmp_path: Path) -> None:
    ring = Ring.open(tmp_path / "r.ring", capacity=CAP)
    ends = fill(ring, int(CAP * POP_FILL) // 100 + 20)  # past the fill mark
    assert ring.bytes_used >= CAP * POP_FILL
    pacer = PopPacer(ring, ring.reader())
    assert pacer.want(ends[0], now=5.0)  # no waiting: producers may need the space
    assert ring.head == ends[0]
    ring.close()


def test_flush_pops_what_is_pending_and_stopping_twice_is_harmless(tmp_path: Path) -> None:
    ring = Ring.open(tmp_path / "r.ring", capacity=CAP)
    ends = fill(ring, 3)
    pacer = PopPacer(ring, ring.reader())
    pacer.want(ends[-1], now=1.0)
    assert pacer.flush() and ring.depth == 0
    assert not pacer.flush()
    assert not pacer.want(ends[0], now=2.0)  # already popped past it: nothing to do
    ring.close()


def test_acked_records_not_yet_popped_are_still_there_after_a_crash(tmp_path: Path) -> None:
    # What pacing trades: a record acked downstream but not popped is delivered again
    # after a restart (the next stage drops it by position / cursor) -- never lost.
    path = tmp_path / "r.ring"
    ring = Ring.open(path, capacity=CAP)
    ends = fill(ring, 4)
    pacer = PopPacer(ring, ring.reader())
    pacer.want(ends[1], now=1.0)
    pacer.want(ends[2], now=1.0 + POP_INTERVAL + 1e-6)  # due: popped through record 2
    pacer.want(ends[3], now=2.0)  # acked, pending: the process dies here
    ring.close()
    again = Ring.open(path, capacity=CAP)
    records = again.reader().read(again.head, max_records=10, max_bytes=1 << 20)
    assert [r.end for r in records] == [ends[3]]
    again.close()
