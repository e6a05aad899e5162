"""The persistent multi-producer ring (see ``docs/ring.md``).

::

    from node.ring import Ring
    ring = Ring.open(path, capacity=64 << 20, durability="power")
    ok = ring.append(b"...")            # False when full: back-pressure, not an exception
    n = ring.append_batch([b"a", b"b"])  # how many were appended; one persist
    reader = ring.reader()               # the single consumer
    for rec in reader.read(ring.head): ...
    reader.pop(rec.end); reader.wait(0.5)
"""

from __future__ import annotations

from node.ring.errors import (
    ConsumerBusy,
    RecordTooLarge,
    RingBackendError,
    RingClosed,
    RingConfigError,
    RingCorrupt,
    RingError,
    RingNamespaceError,
    RingPersistError,
    RingPositionError,
    RingSpaceError,
    RingVersionError,
)
from node.ring.reader import Reader, Record
from node.ring.ring import Ring

#: What ``append_batch`` returns when the ring is full (``append`` returns False).
#: Not an exception: a full ring is back-pressure, never an error.
RingFull = 0

__all__ = [
    "ConsumerBusy",
    "Reader",
    "Record",
    "RecordTooLarge",
    "Ring",
    "RingBackendError",
    "RingClosed",
    "RingConfigError",
    "RingCorrupt",
    "RingError",
    "RingFull",
    "RingNamespaceError",
    "RingPersistError",
    "RingPositionError",
    "RingSpaceError",
    "RingVersionError",
]
