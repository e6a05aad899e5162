"""The SQLite store (contract 5) read as an ordered, durable log.

The ``messages`` table is a rowid table written by a single process (the store)
that never deletes: each commit appends rows with rowids above every committed
rowid, so ``rowid > cursor ORDER BY rowid`` reads rows in commit order -- a
device's rows in its seq order -- and a reader in WAL mode sees whole commits
only.  A sink's cursor is the rowid of the last row it made durable.
"""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

# One row as read: (rowid, device_id, seq, ts, received_at, data JSON text)
RawRow = tuple[int, str, int, "float | None", float, str]

_READ = (
    "SELECT rowid, device_id, seq, ts, received_at, data FROM messages WHERE rowid > ? ORDER BY rowid LIMIT ?"
)


def source_key(store_path: Path) -> str:
    """A sink's cursor key: which node's store it tails (several nodes may share a destination)."""
    return f"{socket.gethostname()}:{store_path.resolve()}"


class StoreLog:
    """Read-only access to ``store.sqlite3``; :meth:`open` returns False until the store exists."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def open(self) -> bool:
        if self._db is not None:
            return True
        if not self.path.exists():
            return False
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, isolation_level=None)
            db.execute("PRAGMA query_only=1")
            db.execute("PRAGMA busy_timeout=5000")
            db.execute("SELECT 1 FROM messages LIMIT 0")
        except sqlite3.Error:
            return False  # created but without its schema yet: the store is starting
        self._db = db
        return True

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("StoreLog used before open()")
        return self._db

    def read(self, after: int, limit: int) -> list[RawRow]:
        """Up to ``limit`` rows with ``rowid > after``, in rowid order."""
        return self._conn().execute(_READ, (after, limit)).fetchall()

    def last_rowid(self) -> int:
        row = self._conn().execute("SELECT max(rowid) FROM messages").fetchone()
        return int(row[0] or 0)

    def received_at_after(self, after: int) -> float | None:
        """``received_at`` of the first row after ``after`` (the oldest one a sink still owes)."""
        row = (
            self._conn()
            .execute("SELECT received_at FROM messages WHERE rowid > ? ORDER BY rowid LIMIT 1", (after,))
            .fetchone()
        )
        return None if row is None else float(row[0])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
