"""Parquet lake sink (``NODE_LAKE_DIR``): hive-partitioned files, the cursor committed with them.

Layout (DuckDB reads it as is: ``read_parquet('LAKE/*/*/*.parquet', hive_partitioning = true)``)::

    LAKE/date=2026-12-02/type=thermo/part-00000000000000000001-00000000000000005000.parquet
    LAKE/_iotnode/commit.json         the last commit: its cursor and files (the sink's cursor)

``date`` is the UTC day of ``received_at``; ``type`` the device type (characters
outside ``[A-Za-z0-9_.-]`` become ``_``).  Columns: ``device_id, seq, ts,
received_at`` (timestamp, UTC), ``class, region, site, lat, lon, geohash``,
``labels`` and ``data`` (JSON text), ``store_rowid``.

Rows are buffered and written when ``NODE_LAKE_FLUSH_ROWS`` are buffered or the
oldest is ``NODE_LAKE_FLUSH_SECONDS`` old (the SQLite store holds them meanwhile).
A flush, with ``F..L`` the store rowids it covers:

1. each partition's rows go to ``part-F-L.parquet.tmp`` (invisible to ``*.parquet``), fsync;
2. ``_iotnode/commit.json`` = ``{"cursor": L, "files": [...]}`` via a temporary file,
   fsync, rename, fsync of the directory -- **the commit point**;
3. each ``.tmp`` is renamed to its final name, directories fsynced.

At open, a commit whose files are still ``.tmp`` is rolled forward (step 3 again)
and every other ``.tmp`` (a flush that crashed before its commit point) is
deleted; its rows are after the cursor and are written again.  So a crash never
leaves a half-written file visible nor a row twice.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from node.privatefile import fsync_dir
from node.storage.enrich import Row, labels_json
from node.storage.tail import SinkDown, TailSink

META_DIR = "_iotnode"
COMMIT = "commit.json"
_DAY = 86400
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")

SCHEMA = pa.schema(
    [
        ("device_id", pa.string()),
        ("seq", pa.int64()),
        ("ts", pa.float64()),
        ("received_at", pa.timestamp("us", tz="UTC")),
        ("class", pa.string()),
        ("region", pa.string()),
        ("site", pa.string()),
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        ("geohash", pa.string()),
        ("labels", pa.string()),
        ("data", pa.string()),
        ("store_rowid", pa.int64()),
    ]
)


def partition_value(raw: str) -> str:
    out = "".join(c if c in _SAFE else "_" for c in raw) or "_"
    return "_" + out if out.startswith(".") else out


class LakeSink(TailSink):
    name = "lake"

    def __init__(self, root: Path, flush_rows: int = 100_000, flush_seconds: float = 60.0) -> None:
        super().__init__()
        self.root = root
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.meta = root / META_DIR
        self._buffer: dict[tuple[str, str], list[Row]] = {}
        self._buffered = 0
        self._first_at = 0.0
        self._pending_cursor = 0
        self._first_rowid = 0
        self._opened = False

    # ------------------------------------------------------------------ open / recover
    def open(self) -> None:
        try:
            self.meta.mkdir(parents=True, exist_ok=True)
            committed = self._recover()
        except OSError as exc:
            raise SinkDown("filesystem", f"lake {self.root}: {exc}") from None
        self.durable = self._pending_cursor = committed
        self._buffer.clear()
        self._buffered = 0
        self._opened = True

    def _recover(self) -> int:
        """Finish the last commit, delete uncommitted temporary files; return the cursor."""
        commit_path = self.meta / COMMIT
        cursor = 0
        keep: set[Path] = set()
        if commit_path.exists():
            commit = json.loads(commit_path.read_text())
            cursor = int(commit["cursor"])
            for name in commit["files"]:
                final = self.root / name
                tmp = final.with_name(final.name + ".tmp")
                keep.add(tmp)
                if tmp.exists():
                    os.replace(tmp, final)
                    fsync_dir(final.parent)
        for tmp in self.root.glob("date=*/type=*/*.tmp"):
            if tmp not in keep:
                tmp.unlink()
        for tmp in self.meta.glob("*.tmp"):
            tmp.unlink()
        return cursor

    def cursor(self) -> int:
        return self.durable

    # ------------------------------------------------------------------ buffering
    def write(self, rows: Sequence[Row], cursor: int) -> None:
        if not self._opened:
            raise SinkDown("filesystem", "lake not open")
        if not self._buffered and rows:
            self._first_at = time.monotonic()
            self._first_rowid = rows[0].rowid
        for r in rows:
            day = dt.datetime.fromtimestamp(int(r.received_at // _DAY) * _DAY, dt.UTC).strftime("%Y-%m-%d")
            key = (day, partition_value(r.ctx.type))
            part = self._buffer.get(key)
            if part is None:
                part = self._buffer[key] = []
            part.append(r)
        self._buffered += len(rows)
        self._pending_cursor = cursor
        # By time here too, not only in idle(): under steady load the sink is never idle,
        # and its oldest buffered row would otherwise wait for flush_rows.
        if self._buffered >= self.flush_rows or time.monotonic() - self._first_at >= self.flush_seconds:
            self.flush()

    def idle(self) -> None:
        if self._buffered and time.monotonic() - self._first_at >= self.flush_seconds:
            self.flush()

    # ------------------------------------------------------------------ commit
    def flush(self) -> None:
        if not self._buffered:
            return
        first, last = self._first_rowid, self._pending_cursor
        name = f"part-{first:020d}-{last:020d}.parquet"
        try:
            files: list[str] = []
            for (day, type_), rows in sorted(self._buffer.items()):
                directory = self.root / f"date={day}" / f"type={type_}"
                directory.mkdir(parents=True, exist_ok=True)
                tmp = directory / (name + ".tmp")
                with open(tmp, "wb") as fh:
                    pq.write_table(_table(rows), fh, compression="zstd")
                    fh.flush()
                    os.fsync(fh.fileno())
                files.append(str((directory / name).relative_to(self.root)))
            commit_tmp = self.meta / (COMMIT + ".tmp")
            with open(commit_tmp, "w") as fh:
                json.dump({"cursor": last, "files": files, "at": time.time()}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(commit_tmp, self.meta / COMMIT)
            fsync_dir(self.meta)  # ---- committed: the rest is rolled forward at open if we crash
            dirs = set()
            for rel in files:
                final = self.root / rel
                os.replace(final.with_name(final.name + ".tmp"), final)
                dirs.add(final.parent)
            for directory in dirs:
                fsync_dir(directory)
        except OSError as exc:
            self._opened = False  # recover (roll forward / clean up) at the next open
            raise SinkDown("filesystem", f"lake flush of rows {first}..{last} failed: {exc}") from None
        self.durable = last
        self._buffer.clear()
        self._buffered = 0

    def close(self) -> None:
        self._opened = False
        self._buffer.clear()
        self._buffered = 0


def _table(rows: Sequence[Row]) -> pa.Table:
    ctxs = [r.ctx for r in rows]
    return pa.Table.from_arrays(
        [
            pa.array([r.device_id for r in rows], pa.string()),
            pa.array([r.seq for r in rows], pa.int64()),
            pa.array([r.ts for r in rows], pa.float64()),
            pa.array([round(r.received_at * 1_000_000) for r in rows], pa.int64()).cast(
                pa.timestamp("us", tz="UTC")
            ),
            pa.array([c.class_ for c in ctxs], pa.string()),
            pa.array([c.region for c in ctxs], pa.string()),
            pa.array([c.site for c in ctxs], pa.string()),
            pa.array([c.lat for c in ctxs], pa.float64()),
            pa.array([c.lon for c in ctxs], pa.float64()),
            pa.array([c.geohash for c in ctxs], pa.string()),
            pa.array([labels_json(c) for c in ctxs], pa.string()),
            pa.array([r.data_json for r in rows], pa.string()),
            pa.array([r.rowid for r in rows], pa.int64()),
        ],
        schema=SCHEMA,
    )
