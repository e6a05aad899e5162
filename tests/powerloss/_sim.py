"""Shared pieces of the power-loss tests: payloads that name themselves, the checker.

The invariant checked at every simulated power cut (``check_cut``), with
``acked`` = records whose append returned, ``popped`` = records released by a pop
that returned, ``seen`` = records a ``read()`` returned (with their positions),
``maybe_popped`` = records of a pop interrupted before its persist returned:

1. every record recovery delivers is one that was appended, byte for byte (no torn
   or garbage record), and none is delivered twice;
2. every acked or seen record that is not popped (nor maybe popped) is delivered;
3. no popped record is delivered (a reused position never resurrects one);
4. every seen record is delivered at the position it was seen at;
5. records are delivered in ring order, so each producer's acked ones keep its append order;
6. the recovered ring accepts an append after them, and its epoch is above every
   epoch seen before the cut.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from node.ring.powersim import recover_image

_HDR = struct.Struct("<4sIH")  # magic, record id, filler length
_MAGIC = b"PLT1"


def payload(rid: int, size: int) -> bytes:
    """The payload of record ``rid``: at least 10 bytes, content derived from the id."""
    flen = max(0, size - _HDR.size)
    return _HDR.pack(_MAGIC, rid, flen) + bytes((rid * 131 + i * 7) & 0xFF for i in range(flen))


def parse(data: bytes) -> int | None:
    """The record id if ``data`` is exactly a payload made by :func:`payload`, else None."""
    if len(data) < _HDR.size:
        return None
    magic, rid, flen = _HDR.unpack_from(data)
    if magic != _MAGIC or flen != len(data) - _HDR.size or data != payload(rid, len(data)):
        return None
    return int(rid)


@dataclass
class Books:
    """What the test knows happened before the cut."""

    acked: dict[int, tuple[int, int]] = field(default_factory=dict)  # rid -> (producer, append order)
    seen: dict[int, int] = field(default_factory=dict)  # rid -> position read at
    popped: set[int] = field(default_factory=set)
    maybe_popped: set[int] = field(default_factory=set)
    required: set[int] = field(default_factory=set)  # survived an earlier cut: durable
    attempted: set[int] = field(default_factory=set)  # any append started (dead claims too)
    attempted_ok: Callable[[int], bool] | None = None  # or: a test of the id (other processes)
    max_epoch: int = 0

    def ack(self, rids: Iterable[int], producer: int = 0) -> None:
        """One producer's appends that returned, in its order (appends of one producer are ordered)."""
        for rid in rids:
            self.acked[rid] = (producer, len(self.acked))


def check_cut(image: bytes, scratch: Path, books: Books) -> tuple[list[str], list[tuple[int, int]]]:
    """Recover ``image`` on a scratch copy; returns (violations, [(pos, rid)] recovered)."""
    from node.ring import Ring

    records, epoch = recover_image(image, scratch)
    problems: list[str] = []
    got: list[tuple[int, int]] = []
    for pos, data in records:
        rid = parse(data)
        if rid is None or not (
            rid in books.attempted or (books.attempted_ok is not None and books.attempted_ok(rid))
        ):
            problems.append(f"garbage or torn record at {pos}: {data[:24]!r}... ({len(data)} bytes)")
            continue
        got.append((pos, rid))
    ids = [rid for _, rid in got]
    present = set(ids)
    if len(present) != len(ids):
        problems.append(f"a record delivered twice: {sorted(r for r in present if ids.count(r) > 1)}")
    gone = books.popped | books.maybe_popped
    must = (set(books.acked) | set(books.seen) | books.required) - gone
    lost = sorted(must - present)
    if lost:
        problems.append(
            f"lost {len(lost)} record(s) that were acked or seen and not popped: {lost[:10]}"
            f" (acked {sorted(set(lost) & set(books.acked))[:10]}, seen "
            f"{sorted(set(lost) & set(books.seen))[:10]})"
        )
    back = sorted(present & books.popped)
    if back:
        problems.append(f"popped record(s) came back: {back[:10]}")
    for pos, rid in got:
        if rid in books.seen and books.seen[rid] != pos:
            problems.append(f"record {rid} seen at {books.seen[rid]} recovered at {pos}")
    order = [books.acked[r] for r in ids if r in books.acked]
    for producer in {g for g, _ in order}:
        seq = [s for g, s in order if g == producer]
        if seq != sorted(seq):
            problems.append(f"acked records of producer {producer} recovered out of append order")
    if epoch <= books.max_epoch:
        problems.append(f"recovered epoch {epoch} not above the epoch {books.max_epoch} before the cut")
    with Ring.open(
        scratch, capacity=len(image) - 4096, backend="mmap"
    ) as ring:  # the recovered ring goes on working
        reader = ring.reader()
        recs = reader.read(max_records=4096)
        if recs:
            reader.pop(recs[-1].end)
        if ring.append(payload(0, 10)) is not True or [r.payload for r in reader.read()] != [payload(0, 10)]:
            problems.append("the recovered ring, emptied, refused an append or did not deliver it")
    return problems, got
