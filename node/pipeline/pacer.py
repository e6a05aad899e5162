"""Pop pacing: a ring consumer releases acked records in a few persists, not one per batch.

Every ``Reader.pop`` persists the ring's head (an ``msync`` of a page on a plain
file, a cache-line flush on pmem) before producers may reuse the space.  Popping
after every acked batch -- 200 times a second per stage at 10,000 msg/s with the
default coalescing -- puts as many disk flushes next to the web front's group
commits, and on a disk-backed node those flushes queue behind each other: the
front's ack tail grew from ~15 ms to ~200 ms at 10k msg/s (docs/bench.md, "C10K
with the whole node").  A pop changes nothing but free space: records that are
acked downstream and not yet popped are simply sent again after a crash, and the
next stage drops them by position (monitor -> router) or by cursor (publisher ->
store).  So pops wait:

* at most :data:`POP_INTERVAL` seconds after the first acked record that was not
  popped, and
* not at all once the ring is :data:`POP_FILL` full (producers may need the space)
  or when the stage stops (:meth:`PopPacer.flush`).

The pacer holds no record positions of its own beyond the one target; the caller
says what may be popped (:meth:`want`) and when to check (:meth:`poll`, with
:meth:`timeout` folded into its poll timeout).
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["POP_FILL", "POP_INTERVAL", "PopPacer"]

POP_INTERVAL = 0.05  # s: longest an acked record stays un-popped
POP_FILL = 0.25  # pop at once when this share of the ring holds un-popped records


class _Reader(Protocol):
    def pop(self, to_pos: int) -> int: ...


class _Ring(Protocol):
    @property
    def head(self) -> int: ...

    @property
    def bytes_used(self) -> int: ...

    @property
    def capacity(self) -> int: ...


class PopPacer:
    """Coalesces one consumer's pops (see the module docstring)."""

    def __init__(
        self, ring: _Ring, reader: _Reader, interval: float = POP_INTERVAL, fill: float = POP_FILL
    ) -> None:
        self.ring = ring
        self.reader = reader
        self.interval = interval
        self.fill_bytes = int(ring.capacity * fill)
        self.target = -1  # highest position that may be popped, not popped yet (-1: none)
        self.since = 0.0  # monotonic time the oldest un-popped target was set

    def want(self, pos: int, now: float | None = None) -> bool:
        """Everything before ``pos`` may be popped; pop now if due.  True if it popped."""
        if pos <= self.target or pos <= self.ring.head:
            return self.poll(now)
        if self.target < 0:
            self.since = time.monotonic() if now is None else now
        self.target = pos
        return self.poll(now)

    def poll(self, now: float | None = None) -> bool:
        """Pop the pending target if its time has come or the ring is getting full."""
        if self.target < 0:
            return False
        now = time.monotonic() if now is None else now
        if now - self.since < self.interval and self.ring.bytes_used < self.fill_bytes:
            return False
        return self.flush()

    def flush(self) -> bool:
        """Pop the pending target now (stage stopping, or due)."""
        if self.target < 0:
            return False
        target, self.target = self.target, -1
        self.reader.pop(target)
        return True

    @property
    def pending(self) -> bool:
        return self.target >= 0

    def timeout(self, now: float | None = None) -> float | None:
        """Seconds until the pending pop is due (None: nothing pending)."""
        if self.target < 0:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, self.since + self.interval - now)
