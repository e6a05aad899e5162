"""The embedded default sink: SQLite in WAL mode (contract 5).

Schema::

    messages(device_id TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL,
             received_at REAL NOT NULL, data TEXT NOT NULL,      -- JSON text of data
             PRIMARY KEY (device_id, seq))
    iotnode_cursor(ring_id BLOB PRIMARY KEY, position INTEGER NOT NULL)

One ``write`` is one ``BEGIN IMMEDIATE ... COMMIT``: ``INSERT OR IGNORE`` of the
records (dedup on the key) and the cursor upsert.  ``durability="power"`` uses
``synchronous=FULL`` (the WAL is fsynced at each commit, so a confirmed cursor
survives power loss); ``"process"`` uses ``NORMAL`` (survives any process crash).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from node.record import Record
from node.sinks.base import RecordRejected, Sink, SinkError

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS messages (
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        ts REAL,
        received_at REAL NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (device_id, seq)
    )""",
    """CREATE TABLE IF NOT EXISTS iotnode_cursor (
        ring_id BLOB PRIMARY KEY,
        position INTEGER NOT NULL
    )""",
)

_INSERT = "INSERT OR IGNORE INTO messages (device_id, seq, ts, received_at, data) VALUES (?, ?, ?, ?, ?)"
_SET_CURSOR = (
    "INSERT INTO iotnode_cursor (ring_id, position) VALUES (?, ?)"
    " ON CONFLICT (ring_id) DO UPDATE SET position = excluded.position"
)


# Page size of a new store file, and how much WAL may build up before a checkpoint.
# With the contract's PRIMARY KEY (device_id, seq), every device appends at its own
# place in the key's index: at 10,000 devices a commit of 200 records dirties ~200
# distinct index pages, each written whole to the WAL and again at the checkpoint.
# 4 KiB pages and the default 1000-page checkpoint wrote 7-9 KB per record (80 MB/s
# at 10k msg/s, and every ring msync of the node waited behind it on the same disk);
# 1 KiB pages and a 64 MiB WAL write ~2 KB per record (bench: docs/bench.md, "The
# store's write amplification").  The page size applies only to a new file; an
# existing one keeps its own (the WAL budget is in bytes, so it follows).
PAGE_SIZE = 1024
WAL_CHECKPOINT_BYTES = 64 * 1024 * 1024

# One encoder for every row (json.dumps with options builds a new encoder per call).
_json = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def to_row(record: Record) -> tuple[str, int, float | None, float, str]:
    """The ``messages`` row of a record; ``ValueError``/``TypeError`` if ``data`` is not JSON."""
    ts = record.ts
    return (
        record.device_id,
        record.seq,
        None if ts is None else float(ts),
        float(record.received_at),
        _json(record.data),
    )


class SqliteSink(Sink):
    name = "sqlite"

    def __init__(self, path: Path, durability: str = "power") -> None:
        if durability not in ("power", "process"):
            raise ValueError(f"durability: expected 'power' or 'process', got {durability!r}")
        self.path = path
        self.durability = durability
        self._db: sqlite3.Connection | None = None
        self._last_ring: bytes | None = None

    def open(self) -> None:
        try:
            db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=True)
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # a no-op on an existing file
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise SinkError(f"{self.path}: expected journal_mode wal, got {mode!r}")
            db.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'power' else 'NORMAL'}")
            db.execute("PRAGMA busy_timeout=5000")
            page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
            db.execute(f"PRAGMA wal_autocheckpoint={max(1000, WAL_CHECKPOINT_BYTES // page_size)}")
            for statement in SCHEMA:
                db.execute(statement)
        except sqlite3.Error as exc:
            raise SinkError(f"cannot open SQLite store {self.path}: {exc}") from exc
        self._db = db

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise SinkError("SqliteSink used before open() or after close()")
        return self._db

    def cursor(self, ring_id: bytes) -> int | None:
        row = (
            self._conn()
            .execute("SELECT position FROM iotnode_cursor WHERE ring_id = ?", (ring_id,))
            .fetchone()
        )
        return None if row is None else int(row[0])

    def write(self, records: Sequence[Record], ring_id: bytes, cursor: int) -> int:
        db = self._conn()
        rows = []
        for index, record in enumerate(records):  # refuse before the transaction starts
            try:
                rows.append(to_row(record))
            except (TypeError, ValueError) as exc:
                raise RecordRejected(
                    index, f"device {record.device_id!r} seq {record.seq}: {type(exc).__name__}: {exc}"
                ) from None
        try:
            db.execute("BEGIN IMMEDIATE")
            before = db.total_changes
            db.executemany(_INSERT, rows)
            inserted = db.total_changes - before
            db.execute(_SET_CURSOR, (ring_id, cursor))
            if ring_id != self._last_ring:
                # A recreated fan-in ring: the cursors of old ring files mean nothing any more.
                db.execute("DELETE FROM iotnode_cursor WHERE ring_id != ?", (ring_id,))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise SinkError(f"SQLite write of {len(rows)} records failed: {exc}") from exc
        self._last_ring = ring_id
        return inserted

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
