"""How long a ring can absorb an outage of the stage behind it (free of I/O).

When the next stage is away (the middle tier down for a front node, the store for
the publisher), the ring's consumer pops nothing: the ring fills at the rate
records are appended, and once it is full the stage in front of it pushes back
(the web front stops acking).  Two numbers tell an operator where that stands:

* the **fill ratio**: bytes holding un-popped records / capacity;
* the **headroom**: free bytes / the current append rate in bytes per second, i.e.
  how many more seconds of ingest the ring takes if its consumer stopped now.
  The rate is the growth of the ring's tail (record headers, alignment and wrap
  padding included) between scrapes, over up to :data:`WINDOW` seconds; with
  nothing appended the headroom is infinite.

A record takes :func:`record_bytes` of the ring: the 32-byte header plus the
envelope (``node.record``), aligned to 32 bytes (``node.ring.descriptor``).
:func:`outage_seconds` turns a capacity, a record size and a rate into the
outage the ring covers (README, "Several nodes"; docs/ring.md).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

from node.ring.descriptor import aligned_record_size

WINDOW: Final = 60.0  # s: the append rate is measured over (up to) this long
MIN_SPAN: Final = 1.0  # s: shorter spans between samples do not make a rate


def record_bytes(envelope_length: int) -> int:
    """Bytes of the ring one record with an envelope of ``envelope_length`` bytes takes."""
    return aligned_record_size(envelope_length)


def outage_seconds(capacity: int, record_size: int, rate: float) -> float:
    """Seconds of ingest at ``rate`` records/s an empty ring of ``capacity`` bytes absorbs."""
    if rate <= 0:
        return math.inf
    return capacity / record_size / rate


class FillRate:
    """The append rate of a ring from ``(time, tail)`` samples, one per scrape."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque(maxlen=1024)
        self.rate = 0.0  # bytes per second, the last one measured

    def observe(self, now: float, tail: int) -> float:
        """Record the tail at ``now``; return the append rate in bytes/s."""
        samples = self.samples
        samples.append((now, tail))
        # Keep the oldest sample that is still within the window (and at least one).
        while len(samples) > 2 and now - samples[1][0] >= self.window:
            samples.popleft()
        then, old_tail = samples[0]
        span = now - then
        if span >= MIN_SPAN:
            self.rate = max(0, tail - old_tail) / span
        return self.rate

    def headroom(self, now: float, tail: int, capacity: int, used: int) -> float:
        """Seconds until the ring is full at the current append rate (``inf`` when idle)."""
        rate = self.observe(now, tail)
        free = max(0, capacity - used)
        if rate <= 0:
            return math.inf
        return free / rate
