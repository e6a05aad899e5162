"""The SQLite store (contract 5) read as an ordered, durable log.

The ``messages`` table is a rowid table written by a single process (the store)
that never deletes: each commit appends rows with rowids above every committed
rowid, so ``rowid > cursor ORDER BY rowid`` reads rows in commit order -- a
device's rows in its seq order -- and a reader in WAL mode sees whole commits
only.  A sink's cursor is the rowid of the last row it made durable.

:meth:`StoreLog.read` returns the rows as Python's sqlite3 makes them (one tuple of six
objects per row); :meth:`StoreLog.read_columns` returns the same rows as flat buffers
(:class:`Columns`), stepped in C with SQLite's own C API (``_storeread.c``) -- about 3x
cheaper, and what Arrow and the VictoriaMetrics formatter read without a Python object
per row.  The C reader uses the very libsqlite3 Python's sqlite3 module has loaded (two
copies of SQLite in one process would not see each other's POSIX locks); where that
library cannot be found (a Python with SQLite linked in statically) ``columnar`` is
False and the sinks read through :meth:`read`.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
from array import array
from pathlib import Path
from typing import Any, NamedTuple

# One row as read: (rowid, device_id, seq, ts, received_at, data JSON text)
RawRow = tuple[int, str, int, "float | None", float, str]

_READ = (
    "SELECT rowid, device_id, seq, ts, received_at, data FROM messages WHERE rowid > ? ORDER BY rowid LIMIT ?"
)


log = logging.getLogger("node.storage.source")


class Columns(NamedTuple):
    """``count`` store rows in rowid order, as buffers (native byte order; ``_storeread.c``)."""

    count: int
    rowid: bytes  # int64 each
    device_index: bytes  # int32 each: the row's device in ``devices``
    devices: list[str]  # each device of the batch once, in first-seen order
    counts: list[int]  # rows per device, as ``devices``
    seq: bytes  # int64 each
    ts: bytes  # float64 each, 0.0 where NULL
    ts_valid: bytes  # Arrow validity bitmap of ts: bit i (least significant first) set = not NULL
    ts_nulls: int
    received_at: bytes  # float64 each
    data_offsets: bytes  # int32 each, count + 1: row i's data is data[offsets[i]:offsets[i + 1]]
    data: bytes  # the rows' data JSON text, UTF-8 (validated by :meth:`StoreLog.read_columns`)

    def tuples(self) -> list[RawRow]:
        """The rows as :meth:`StoreLog.read` returns them."""
        rowid, seq = array("q", self.rowid), array("q", self.seq)
        ts, at = array("d", self.ts), array("d", self.received_at)
        index, offsets = array("i", self.device_index), array("i", self.data_offsets)
        valid, devices, data = self.ts_valid, self.devices, self.data
        return [
            (
                rowid[i],
                devices[index[i]],
                seq[i],
                ts[i] if valid[i >> 3] >> (i & 7) & 1 else None,
                at[i],
                data[offsets[i] : offsets[i + 1]].decode(),
            )
            for i in range(self.count)
        ]


_native: Any = None  # node.storage._storeread once loaded; False: not available here


def _columnar() -> Any:
    """The C reader with Python's own libsqlite3 loaded into it, or None (see the module doc)."""
    global _native
    if _native is None:
        _native = False
        try:
            from node.storage import _storeread  # type: ignore[attr-defined,unused-ignore]
        except ImportError as exc:
            log.warning(
                "the columnar store reader (node.storage._storeread) is not built (%s): reading rows", exc
            )
            return None
        library = _sqlite_library()
        if library is None:
            log.info("Python's sqlite3 has no shared libsqlite3 loaded: the sinks read the store row by row")
            return None
        try:
            _storeread.load(library, sqlite3.OperationalError)
        except OSError as exc:
            log.warning("cannot load %s into the columnar store reader (%s): reading rows", library, exc)
            return None
        _native = _storeread
    return _native or None


def _sqlite_library() -> str | None:
    """The path of the libsqlite3 this process has mapped (the one ``_sqlite3`` links to)."""
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split(maxsplit=5)  # address perms offset device inode path
                path = fields[5].strip() if len(fields) == 6 else ""
                if Path(path).name.startswith("libsqlite3.so"):
                    # a library replaced on disk since ("... (deleted)"): dlopen() would load a second copy
                    return None if path.endswith(" (deleted)") else path
    except OSError:
        pass
    return None


def source_key(store_path: Path) -> str:
    """A sink's cursor key: which node's store it tails (several nodes may share a destination)."""
    return f"{socket.gethostname()}:{store_path.resolve()}"


class StoreLog:
    """Read-only access to ``store.sqlite3``; :meth:`open` returns False until the store exists."""

    def __init__(self, path: Path, columnar: bool = True) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._reader: Any = None  # _storeread.Reader, opened by the first read_columns()
        #: whether :meth:`read_columns` is available (the C reader is built and could load SQLite)
        self.columnar = columnar and _columnar() is not None

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

    def read_columns(self, after: int, limit: int) -> Columns | None:
        """:meth:`read` as :class:`Columns` (None: no rows).  ``ValueError`` (naming the row) for a
        row whose columns are not of the store's types or whose text is not UTF-8: read that batch
        with :meth:`read` (which then gives what Python's sqlite3 gives)."""
        if not self.columnar:
            raise RuntimeError("read_columns: the columnar reader is not available here")
        self._conn()  # opened
        if self._reader is None:
            self._reader = _columnar().Reader(str(self.path))
        got = self._reader.read(after, limit)
        if got is None:
            return None
        cols = Columns(*got)
        cols.data.decode()  # UnicodeDecodeError (a ValueError) for text sqlite3 could not decode either
        return cols

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
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._db is not None:
            self._db.close()
            self._db = None
