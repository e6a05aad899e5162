"""PostgreSQL sink (``NODE_PG_DSN``): partitioned by time, context denormalised, ``data`` as jsonb.

Schema (created when missing)::

    iotnode_messages (device_id text, seq bigint, ts double precision, received_at timestamptz,
                      type text, class text, region text, site text, lat, lon double precision,
                      geohash text, labels jsonb, data jsonb,
                      PRIMARY KEY (device_id, seq, received_at))
        PARTITION BY RANGE (received_at)      -- one partition per UTC day, created on demand
    index (type, region, received_at)         -- "type/region over a time range"
    iotnode_sink_cursor (source text PRIMARY KEY, position bigint, updated_at timestamptz)

The primary key must hold the partition key; ``(device_id, seq)`` alone is the
identity because the SQLite store holds each once with one ``received_at``.

One :meth:`write` is one transaction at ``synchronous_commit = on``: ``COPY`` of the
rows straight into ``iotnode_messages``, the cursor upsert, ``COMMIT``.  Rows and
cursor commit together, so a batch is either there with its cursor or not at all,
and a restart re-sends only batches that never committed: none of them is in the
table.  The primary key stays as the safety net: should a row be there already
(written by something else, or a cursor reset by hand), the ``COPY`` fails with a
unique violation, the transaction is rolled back and that batch goes again the
tolerant way -- ``COPY`` into a temporary staging table, ``INSERT ... SELECT ... ON
CONFLICT DO NOTHING`` (the rows already there are ignored), the cursor upsert,
``COMMIT`` (the write path of every batch before issue 13: a second pass of each
row in the server).  ``received_at`` is converted exactly as ``to_timestamp()``
does on the staging path (:func:`pg_timestamp`), so both paths give a row the same
key.

**Formatting in C.**  The sink reads the store in columns (:func:`read_column_batch`, the C
reader of ``_storeread.c``) and ``_pgcopy.c`` builds the batch's ``COPY`` text from them
(:func:`copy_data`): the UTF-8 of :func:`copy_text` byte for byte (a hypothesis test compares
them), without a Python object per row; a ``data`` text with a backslash, tab, newline or CR
goes through :func:`_data_field`, a batch with a receive time outside years 1000..9999 through
:func:`copy_text`.  Used when the connection's client encoding is UTF-8 (else psycopg encodes
the Python text itself) and the extension is built (else logged, and Python formats).

While the server still parses and indexes the end of a batch's ``COPY`` (the data
in the socket's buffer), the sink reads the next batch from the SQLite store
(:meth:`PostgresSink.read`): the tail gets it when it asks for the rows after that
batch with the same registry; anything else (a reconnect, a reloaded registry)
drops it and reads again.

``jsonb`` holds no NUL character and ``text`` no NUL byte: a ``\u0000`` escape in
``data`` or in the labels becomes ``\ufffd`` (:func:`jsonb_text`; an escaped backslash
followed by ``u0000`` is text and stays), a NUL in a context value (the registry
file) becomes U+FFFD -- on both paths.  The partition a row goes to is the UTC day of
its ``received_at`` as PostgreSQL rounds it to the microsecond (:func:`pg_day`).
A row PostgreSQL still refuses (``DataError``, e.g. a lone surrogate escape) makes
that batch go again row by row under savepoints: the refused row is logged, counted
(``iotnode_errors_total{stage="postgres", reason="rejected"}``) and skipped -- the
store's own rule for a record it cannot store -- instead of stopping the sink.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from operator import itemgetter
from typing import Any

import psycopg

from node.metrics import ERRORS
from node.registry import DeviceContext, Registry
from node.storage.enrich import Batch, ColumnBatch, Row, labels_json, read_batch, read_column_batch
from node.storage.source import StoreLog
from node.storage.tail import SinkDown, TailSink

try:
    from node.storage._pgcopy import (  # type: ignore[import-not-found,import-untyped,unused-ignore]
        format_copy,
    )
except ImportError:  # pragma: no cover - a build problem: the sink formats in Python then (logged)
    format_copy = None

TABLE = "iotnode_messages"
CURSORS = "iotnode_sink_cursor"

_SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        device_id text NOT NULL,
        seq bigint NOT NULL,
        ts double precision,
        received_at timestamptz NOT NULL,
        type text NOT NULL,
        class text NOT NULL,
        region text NOT NULL,
        site text NOT NULL,
        lat double precision,
        lon double precision,
        geohash text NOT NULL,
        labels jsonb NOT NULL,
        data jsonb NOT NULL,
        PRIMARY KEY (device_id, seq, received_at)
    ) PARTITION BY RANGE (received_at)""",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_type_region_time ON {TABLE} (type, region, received_at)",
    f"""CREATE TABLE IF NOT EXISTS {CURSORS} (
        source text PRIMARY KEY,
        position bigint NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
)
_STAGE = """CREATE TEMP TABLE iotnode_stage (
    device_id text, seq bigint, ts double precision, received_at double precision,
    type text, class text, region text, site text, lat double precision, lon double precision,
    geohash text, labels text, data text
) ON COMMIT DELETE ROWS"""
_COLUMNS = "device_id, seq, ts, received_at, type, class, region, site, lat, lon, geohash, labels, data"
_COPY = f"COPY iotnode_stage ({_COLUMNS}) FROM STDIN"
_COPY_DIRECT = f"COPY {TABLE} ({_COLUMNS}) FROM STDIN"
_MERGE = f"""INSERT INTO {TABLE}
    SELECT device_id, seq, ts, to_timestamp(received_at), type, class, region, site, lat, lon,
           geohash, labels::jsonb, data::jsonb
    FROM iotnode_stage ON CONFLICT DO NOTHING"""
_SET_CURSOR = (
    f"INSERT INTO {CURSORS} (source, position) VALUES (%s, %s)"
    " ON CONFLICT (source) DO UPDATE SET position = excluded.position, updated_at = now()"
)
_INSERT_ONE = f"""INSERT INTO {TABLE} VALUES (%s, %s, %s, to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s,
    %s::jsonb, %s::jsonb) ON CONFLICT DO NOTHING"""
_DAY = 86400
CopyChunk = str | bytes | memoryview  # what copy_data yields: Python text, or slices of the C text
_CHUNK = 256 * 1024  # bytes of C-built COPY data per write
_PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_PG_EPOCH_UNIX = 946684800.0  # s from the unix epoch to PostgreSQL's
_PG_EPOCH_DAYS = 10957  # days from the unix epoch to PostgreSQL's
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")  # a \u0000 escape (not an escaped backslash + u0000)
log = logging.getLogger("node.storage.postgres")


def pg_micros(seconds: float) -> int:
    """Microseconds since 2000-01-01 UTC of ``to_timestamp(seconds)`` (``float8_timestamptz``:
    ``rint((seconds - 946684800) * 1e6)``, IEEE doubles, round half to even like Python's ``round``)."""
    return round((seconds - _PG_EPOCH_UNIX) * 1_000_000.0)


def pg_day(seconds: float) -> int:
    """The UTC day (days since 1970) of ``to_timestamp(seconds)``: the row's partition.  Not
    ``seconds // 86400``: 0.4 µs before midnight is rounded to midnight, the next day."""
    return (pg_micros(seconds) // 1_000_000 + _PG_EPOCH_DAYS * _DAY) // _DAY


def jsonb_text(text: str) -> str:
    """JSON text ``jsonb`` accepts: each ``\\u0000`` escape (jsonb holds no NUL) becomes ``\\ufffd``.
    An escape is a backslash after an even number of backslashes (``"\\\\u0000"`` is the text
    backslash-u0000, left as it is)."""
    if "\\u0000" not in text:
        return text
    return _NUL_ESCAPE.sub(r"\1\\ufffd", text)


def _text(value: str) -> str:
    """A context value as ``text`` holds it (no NUL byte: U+FFFD instead)."""
    return value.replace("\0", "\ufffd") if "\0" in value else value


def pg_timestamp(seconds: float) -> dt.datetime:
    """``to_timestamp(seconds)`` as PostgreSQL computes it (``float8_timestamptz``: microseconds
    since 2000 = ``rint((seconds - 946684800) * 1e6)``, IEEE doubles and round-half-even like
    Python's ``round``), so a row gets the same key on the direct and the staging path."""
    return _PG_EPOCH + dt.timedelta(microseconds=pg_micros(seconds))


def _copy_field(value: object) -> str:
    """A value in ``COPY`` text format (NULL ``\\N``; backslash, tab, newline, CR escaped)."""
    if value is None:
        return "\\N"
    text = repr(value) if isinstance(value, float) else str(value)
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text


def _context(ctx: DeviceContext) -> tuple[str, str, str, str, float | None, float | None, str, str]:
    """A device's context columns (type .. labels) as both paths store them."""
    return (
        _text(ctx.type),
        _text(ctx.class_),
        _text(ctx.region),
        _text(ctx.site),
        ctx.lat,
        ctx.lon,
        _text(ctx.geohash),
        jsonb_text(labels_json(ctx)),
    )


def _device_fields(device_id: str, ctx: DeviceContext) -> tuple[str, str]:
    """A device's ``COPY`` fields: its id, and its context columns between received_at and data."""
    return _copy_field(device_id), "\t" + "\t".join(_copy_field(v) for v in _context(ctx)) + "\t"


def copy_text(batch: Batch, chunk_rows: int = 500) -> Iterator[str]:
    """The batch's rows as ``COPY ... FROM STDIN`` text (the columns of ``_COLUMNS``), in chunks.

    Built here rather than by ``copy.write_row`` (≈ 5 µs a row, most of it dumping the
    datetime): each device's fields are formatted once per batch, ``received_at`` as
    text from :func:`pg_timestamp`'s microseconds (the text of each second once).
    """
    devices = {d: _device_fields(d, ctx) for d, ctx in batch.contexts.items()}
    seconds: dict[int, str] = {}
    epoch, unix, null = _PG_EPOCH, _PG_EPOCH_UNIX, "\\N"
    out = []
    for _rowid, device_id, seq, ts, at, data in batch.raw:
        if "\\" in data or "\t" in data or "\n" in data or "\r" in data:
            data = _copy_field(jsonb_text(data))
        second, micro = divmod(round((at - unix) * 1_000_000.0), 1_000_000)  # as pg_timestamp()
        when = seconds.get(second)
        if when is None:
            when = seconds[second] = f"{epoch + dt.timedelta(seconds=second):%Y-%m-%d %H:%M:%S}"
        ident, context = devices[device_id]
        out.append(
            f"{ident}\t{seq}\t{null if ts is None else repr(ts)}\t{when}.{micro:06d}+00{context}{data}\n"
        )
        if len(out) == chunk_rows:
            yield "".join(out)
            out.clear()
    if out:
        yield "".join(out)


def _data_field(data: str) -> str:
    """A data text with a backslash, tab, newline or CR as its ``COPY`` field (as :func:`copy_text`)."""
    return _copy_field(jsonb_text(data))


def copy_data(batch: Batch, native: bool = True) -> tuple[Iterable[CopyChunk], set[int]]:
    """The batch's ``COPY`` data and the UTC days (:func:`pg_day`) of its rows: built in C
    from the columns (``_pgcopy.c``, the UTF-8 of :func:`copy_text`, byte for byte) for a
    :class:`ColumnBatch` when ``native`` and the module is built, else :func:`copy_text`."""
    if native and format_copy is not None and isinstance(batch, ColumnBatch):
        fields = [_device_fields(d, batch.contexts[d]) for d in batch.cols.devices]
        made = format_copy(batch.cols, [f[0] for f in fields], [f[1] for f in fields], _data_field)
        if made is not None:  # None: a receive time the C code leaves to Python
            body, days = made
            return (memoryview(body)[k : k + _CHUNK] for k in range(0, len(body), _CHUNK)), set(days)
    return copy_text(batch), set(map(pg_day, map(itemgetter(4), batch.raw)))


def _values(r: Row) -> tuple[Any, ...]:
    """A row's parameters on the staging and the row-by-row path (``received_at`` in seconds)."""
    return (r.device_id, r.seq, r.ts, r.received_at, *_context(r.ctx), jsonb_text(r.data_json))


def check_dsn(dsn: str) -> str | None:
    """None when libpq can parse ``dsn``, else why not (without echoing the DSN: it may hold a password)."""
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        return str(exc).split("\n")[0]
    return None


class PostgresSink(TailSink):
    name = "postgres"

    def __init__(self, dsn: str, source: str, connect_timeout: float = 5.0) -> None:
        super().__init__()
        self.dsn = dsn
        self.source = source
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._days: set[int] = set()  # UTC days whose partition exists (committed)
        self._reader: tuple[StoreLog, int, Registry] | None = None  # how the tail last read
        self._ahead: tuple[int, Registry, Batch] | None = None  # (after, registry, the batch after it)
        self._native = False  # COPY text built in C from batches read in columns (set by open())

    def open(self) -> None:
        try:
            conn = psycopg.connect(
                self.dsn, connect_timeout=max(1, int(self.connect_timeout)), autocommit=False
            )
        except psycopg.Error as exc:
            raise SinkDown("connect", f"cannot connect to PostgreSQL: {_first_line(exc)}") from None
        try:
            with conn.cursor() as cur:
                cur.execute("SET synchronous_commit = on")
                cur.execute("SELECT pg_advisory_xact_lock(hashtext('iotnode_schema'))")
                for statement in _SCHEMA:
                    cur.execute(statement)
                cur.execute(_STAGE)
            conn.commit()
        except psycopg.Error as exc:
            conn.close()
            raise SinkDown("schema", f"cannot create the PostgreSQL schema: {_first_line(exc)}") from None
        self._conn = conn
        self._days = set()
        self._ahead = None
        # The C text is UTF-8: used when the connection's client encoding is UTF-8 (psycopg
        # encodes the Python text in any other encoding itself).
        self._native = format_copy is not None and conn.info.encoding == "utf-8"
        if format_copy is None:
            log.warning("node.storage._pgcopy is not built: COPY text formatted in Python (pip install .)")

    def cursor(self) -> int:
        conn = self._need()
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT position FROM {CURSORS} WHERE source = %s", (self.source,))
                row = cur.fetchone()
            conn.commit()
        except psycopg.Error as exc:
            raise SinkDown("cursor", f"cannot read the cursor: {_first_line(exc)}") from None
        return 0 if row is None else int(row[0])

    def _need(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise SinkDown("connect", "not connected")
        return self._conn

    def read(self, source: StoreLog, after: int, limit: int, registry: Registry) -> Batch | None:
        """The rows after ``after``: read while the server was still busy with the previous
        batch's ``COPY`` (:meth:`_read_ahead`) when that is what is asked, else read now."""
        self._reader = (source, limit, registry)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == after and ahead[1] is registry:
            return ahead[2]
        return self._read(source, after, limit, registry)

    def _read(self, source: StoreLog, after: int, limit: int, registry: Registry) -> Batch | None:
        """In columns (the C reader) when the COPY text is built in C, else as rows."""
        if self._native:
            return read_column_batch(source, after, limit, registry)
        return read_batch(source, after, limit, registry)

    def _read_ahead(self, after: int) -> None:
        """Read the next batch from the store now -- the ``COPY`` data is sent, the server is
        still parsing and indexing it (the socket's buffer of it) -- instead of after the commit,
        when the server would wait for us.  A read error is left to the tail's own read."""
        if self._reader is None:
            return
        source, limit, registry = self._reader
        try:
            batch = self._read(source, after, limit, registry)
        except sqlite3.Error:
            return
        if batch is not None:
            self._ahead = (after, registry, batch)

    def write(self, batch: Batch) -> None:
        conn = self._need()
        cursor = batch.last
        chunks, days = copy_data(batch, self._native)
        days -= self._days
        try:
            try:
                self._write_direct(conn, batch, chunks, days)
            except psycopg.errors.UniqueViolation:
                # Rows already in the table (not by this sink's committed batches: those carry
                # their cursor): store the rest the tolerant way.
                self._rollback(conn)
                log.warning(
                    "store rowids %d..%d: some rows are in PostgreSQL already: merging them with"
                    " ON CONFLICT DO NOTHING",
                    batch.first,
                    cursor,
                )
                self._write_staged(conn, batch.rows, days)
            with conn.cursor() as cur:
                cur.execute(_SET_CURSOR, (self.source, cursor))
            conn.commit()
        except psycopg.DataError:
            # A row PostgreSQL cannot represent (e.g. JSON with a lone surrogate escape, which
            # jsonb refuses): find it row by row instead of retrying the same batch forever.
            self._rollback(conn)
            self._write_row_by_row(conn, batch.rows, cursor, days)
        except psycopg.Error as exc:
            self._rollback(conn)
            raise SinkDown(
                "connection" if conn.broken or isinstance(exc, psycopg.OperationalError) else "write",
                f"PostgreSQL write of {batch.count} rows failed: {_first_line(exc)}",
            ) from None
        self._days |= days
        self.durable = cursor

    def _write_direct(
        self, conn: psycopg.Connection[Any], batch: Batch, chunks: Iterable[CopyChunk], days: set[int]
    ) -> None:
        with conn.cursor() as cur:
            for day in sorted(days):
                cur.execute(_partition_ddl(day))
            with cur.copy(_COPY_DIRECT) as copy:
                for chunk in chunks:  # the server parses a chunk while the next is formatted (or sent)
                    copy.write(chunk)
                self._read_ahead(batch.last)  # before the end of the COPY: the server is still busy

    @staticmethod
    def _write_staged(conn: psycopg.Connection[Any], rows: Sequence[Row], days: set[int]) -> None:
        with conn.cursor() as cur:
            for day in sorted(days):
                cur.execute(_partition_ddl(day))
            with cur.copy(_COPY) as copy:
                for r in rows:
                    copy.write_row(_values(r))
            cur.execute(_MERGE)

    def _write_row_by_row(
        self, conn: psycopg.Connection[Any], rows: Sequence[Row], cursor: int, days: set[int]
    ) -> None:
        """One transaction; each row under a savepoint; refused rows logged, counted and skipped
        (the store's rule for a record it cannot store)."""
        try:
            with conn.cursor() as cur:
                for day in sorted(days):
                    cur.execute(_partition_ddl(day))
                for r in rows:
                    cur.execute("SAVEPOINT iotnode_row")
                    try:
                        cur.execute(_INSERT_ONE, _values(r))
                    except psycopg.DataError as exc:
                        cur.execute("ROLLBACK TO SAVEPOINT iotnode_row")
                        ERRORS.labels(stage=self.name, reason="rejected").inc()
                        log.error(
                            "device %r seq %d (store rowid %d) refused by PostgreSQL: %s: skipped",
                            r.device_id,
                            r.seq,
                            r.rowid,
                            _first_line(exc),
                        )
                    cur.execute("RELEASE SAVEPOINT iotnode_row")
                cur.execute(_SET_CURSOR, (self.source, cursor))
            conn.commit()
        except psycopg.Error as exc:
            self._rollback(conn)
            raise SinkDown("write", f"PostgreSQL row-by-row write failed: {_first_line(exc)}") from None

    @staticmethod
    def _rollback(conn: psycopg.Connection[Any]) -> None:
        try:
            conn.rollback()
        except psycopg.Error:
            pass

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


def _partition_ddl(day: int) -> str:
    start = dt.datetime.fromtimestamp(day * _DAY, dt.UTC)
    end = start + dt.timedelta(days=1)
    return (
        f"CREATE TABLE IF NOT EXISTS {TABLE}_{start:%Y%m%d} PARTITION OF {TABLE}"
        f" FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().split("\n") or [""])[0] or type(exc).__name__
