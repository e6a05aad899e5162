"""The sink interface of the ``store`` stage.

A sink keeps records *and* the store's cursor in the fan-in ring, and changes both
in one atomic step: that is the whole exactly-once rule.

* ``write(records, ring_id, cursor)`` stores ``records`` (deduplicated on
  ``(device_id, seq)``: a record already present is left as it is) and sets the
  cursor of ``ring_id`` to ``cursor`` -- all of it or nothing.  When it returns,
  both are durable; the store then confirms ``cursor`` to the publisher, which may
  release every fan-in record before it.
* ``cursor(ring_id)`` returns the position written with the last successful
  ``write`` for that ring, or ``None`` when the sink has never seen that ring (a new
  or recreated ring file: the store starts from the ring's head).

A crash between the two halves cannot exist (one transaction), so after a restart
the store resumes exactly at ``cursor``; records before it that arrive again (a
resend, a publisher restart) are ignored by the dedup key.

Exceptions (tree)::

    NodeError
    └── SinkError           the sink cannot open or write (the store exits non-zero)
        └── RecordRejected  (also ValueError) one record cannot be stored (``index``,
                            ``reason``); nothing was written, the store drops that
                            record and writes the rest again
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from node.errors import NodeError
from node.record import Record


class SinkError(NodeError):
    """A sink cannot open, read its cursor or write."""


class RecordRejected(SinkError, ValueError):
    """``records[index]`` cannot be stored (e.g. ``data`` is not JSON-representable)."""

    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        self.reason = reason
        super().__init__(f"record {index} rejected: {reason}")


class Sink(ABC):
    """Where the store stage writes.  One instance per store process."""

    #: Short name used in logs and metrics (``sqlite``, ``postgres``...).
    name: str = "sink"

    @abstractmethod
    def open(self) -> None:
        """Connect / create the schema.  Raises :class:`SinkError`."""

    @abstractmethod
    def cursor(self, ring_id: bytes) -> int | None:
        """The stored cursor of ``ring_id`` (next position to store), or ``None``."""

    @abstractmethod
    def write(self, records: Sequence[Record], ring_id: bytes, cursor: int) -> int:
        """Store ``records`` and set the cursor of ``ring_id``, atomically and durably.

        Returns how many records were new (the others were duplicates).  Raises
        :class:`RecordRejected` (nothing written) for a record it cannot store.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the connection; safe to call twice."""
