"""Store sinks: where the ``store`` stage writes records, behind one small interface.

``base.Sink`` is the interface (exactly-once rule included); ``sqlite.SqliteSink``
is the embedded default (contract 5).  See ``docs/publisher-store.md`` for how to
add another sink (PostgreSQL, Parquet, a time-series database).
"""

from node.sinks.base import RecordRejected, Sink, SinkError

__all__ = ["RecordRejected", "Sink", "SinkError"]
