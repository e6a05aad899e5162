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
import pyarrow.compute as pc
import pyarrow.parquet as pq

from node.privatefile import fsync_dir
from node.registry import Registry
from node.storage.enrich import Batch, ColumnBatch, labels_json, read_column_batch
from node.storage.source import Columns, StoreLog
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
        self._buffer: list[pa.Table] = []  # one per batch: SCHEMA plus the partition columns
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

    def read(self, source: StoreLog, after: int, limit: int, registry: Registry) -> Batch | None:
        return read_column_batch(source, after, limit, registry)  # in columns: Arrow takes the buffers

    # ------------------------------------------------------------------ buffering
    def write(self, batch: Batch) -> None:
        if not self._opened:
            raise SinkDown("filesystem", "lake not open")
        if not self._buffered:
            self._first_at = time.monotonic()
            self._first_rowid = batch.first
        self._buffer.append(_table(batch))
        self._buffered += batch.count
        self._pending_cursor = batch.last
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
            for (day, type_), table in _partitions(self._buffer):
                directory = self.root / f"date={day}" / f"type={type_}"
                directory.mkdir(parents=True, exist_ok=True)
                tmp = directory / (name + ".tmp")
                with open(tmp, "wb") as fh:
                    pq.write_table(table, fh, compression="zstd")
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


_DAY_US = _DAY * 1_000_000
# a store row as read (node.storage.source.RawRow): pa.array() takes the tuples as they are
_RAW = pa.struct(
    [
        ("rowid", pa.int64()),
        ("device_id", pa.string()),
        ("seq", pa.int64()),
        ("ts", pa.float64()),
        ("received_at", pa.float64()),
        ("data", pa.string()),
    ]
)


def _table(batch: Batch) -> pa.Table:
    """A batch as Arrow columns (SCHEMA) plus its partition columns ``_day`` and ``_type``.

    Column by column, in Arrow: the store's columns as the C reader returned them
    (:func:`_arrays`; rows read by Python's sqlite3 go to ``pa.array`` as a struct array,
    flattened), the context columns taken from one entry per device (``batch.contexts`` is
    in the order of the batch's devices), so no Python object is made per row.
    """
    ctxs = list(batch.contexts.values())
    if isinstance(batch, ColumnBatch):  # read in columns: the buffers become Arrow arrays as they are
        rowid, device_arr, seq, ts, received_at, data, which = _arrays(batch.cols)
    else:
        rowid, device_arr, seq, ts, received_at, data = pa.array(batch.raw, _RAW).flatten()
        which = pc.index_in(device_arr, value_set=pa.array(list(batch.contexts), pa.string()))

    def per_device(values: list[object], kind: pa.DataType) -> pa.Array:
        return pa.array(values, kind).take(which)

    # round(received_at * 1e6), half to even like Python's round: the same microsecond as before
    micros = pc.cast(pc.round(pc.multiply(received_at, 1_000_000.0)), pa.int64())
    return pa.Table.from_arrays(
        [
            device_arr,
            seq,
            ts,
            micros.cast(pa.timestamp("us", tz="UTC")),
            per_device([c.class_ for c in ctxs], pa.string()),
            per_device([c.region for c in ctxs], pa.string()),
            per_device([c.site for c in ctxs], pa.string()),
            per_device([c.lat for c in ctxs], pa.float64()),
            per_device([c.lon for c in ctxs], pa.float64()),
            per_device([c.geohash for c in ctxs], pa.string()),
            per_device([labels_json(c) for c in ctxs], pa.string()),
            data,
            rowid,
            # the UTC day of the stored received_at (floor division of its microseconds)
            pc.divide(pc.subtract(micros, pc.if_else(pc.less(micros, 0), _DAY_US - 1, 0)), _DAY_US),
            per_device([partition_value(c.type) for c in ctxs], pa.string()),
        ],
        names=[*SCHEMA.names, "_day", "_type"],
    )


def _arrays(cols: Columns) -> tuple[pa.Array, ...]:
    """rowid, device_id, seq, ts, received_at (float seconds), data and each row's device index
    as Arrow arrays over the column buffers (data was validated as UTF-8 when read)."""
    n = cols.count

    def fixed(kind: pa.DataType, buffer: bytes, valid: bytes | None = None, nulls: int = 0) -> pa.Array:
        bitmap = pa.py_buffer(valid) if valid is not None and nulls else None
        return pa.Array.from_buffers(
            kind, n, [bitmap, pa.py_buffer(buffer)], null_count=nulls if bitmap else 0
        )

    which = fixed(pa.int32(), cols.device_index)
    data = pa.Array.from_buffers(
        pa.string(), n, [None, pa.py_buffer(cols.data_offsets), pa.py_buffer(cols.data)]
    )
    return (
        fixed(pa.int64(), cols.rowid),
        pa.array(cols.devices, pa.string()).take(which),
        fixed(pa.int64(), cols.seq),
        fixed(pa.float64(), cols.ts, cols.ts_valid, cols.ts_nulls),
        fixed(pa.float64(), cols.received_at),
        data,
        which,
    )


def _partitions(tables: Sequence[pa.Table]) -> list[tuple[tuple[str, str], pa.Table]]:
    """The buffered rows per (UTC day, type) partition, sorted, each in store order, as SCHEMA."""
    table = pa.concat_tables(tables)
    keys = table.select(["_day", "_type"]).group_by(["_day", "_type"]).aggregate([])
    out = []
    for day, type_ in zip(keys["_day"].to_pylist(), keys["_type"].to_pylist(), strict=True):
        mask = pc.and_(pc.equal(table["_day"], day), pc.equal(table["_type"], type_))
        part = table.filter(mask).select(SCHEMA.names).cast(SCHEMA)
        name = dt.datetime.fromtimestamp(day * _DAY, dt.UTC).strftime("%Y-%m-%d")
        out.append(((name, type_), part))
    return sorted(out, key=lambda item: item[0])
