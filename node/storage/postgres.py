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
rows into a temporary staging table, ``INSERT ... SELECT ... ON CONFLICT DO
NOTHING`` (a row rewritten after a crash is ignored), the cursor upsert, ``COMMIT``.

``jsonb`` holds no NUL character: a ``\u0000`` escape in ``data`` becomes ``\ufffd``.
A row PostgreSQL still refuses (``DataError``, e.g. a lone surrogate escape) makes
that batch go again row by row under savepoints: the refused row is logged, counted
(``iotnode_errors_total{stage="postgres", reason="rejected"}``) and skipped -- the
store's own rule for a record it cannot store -- instead of stopping the sink.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

import psycopg

from node.metrics import ERRORS
from node.storage.enrich import Row, labels_json
from node.storage.tail import SinkDown, TailSink

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
_COPY = (
    "COPY iotnode_stage (device_id, seq, ts, received_at, type, class, region, site, lat, lon,"
    " geohash, labels, data) FROM STDIN"
)
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
log = logging.getLogger("node.storage.postgres")


def _values(r: Row) -> tuple[Any, ...]:
    ctx = r.ctx
    data = r.data_json
    if "\\u0000" in data:  # jsonb cannot hold NUL characters
        data = data.replace("\\u0000", "\\ufffd")
    return (
        r.device_id,
        r.seq,
        r.ts,
        r.received_at,
        ctx.type,
        ctx.class_,
        ctx.region,
        ctx.site,
        ctx.lat,
        ctx.lon,
        ctx.geohash,
        labels_json(ctx),
        data,
    )


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

    def write(self, rows: Sequence[Row], cursor: int) -> None:
        conn = self._need()
        days = {int(r.received_at // _DAY) for r in rows} - self._days
        try:
            with conn.cursor() as cur:
                for day in sorted(days):
                    cur.execute(_partition_ddl(day))
                with cur.copy(_COPY) as copy:
                    for r in rows:
                        copy.write_row(_values(r))
                cur.execute(_MERGE)
                cur.execute(_SET_CURSOR, (self.source, cursor))
            conn.commit()
        except psycopg.DataError:
            # A row PostgreSQL cannot represent (e.g. JSON with a lone surrogate escape, which
            # jsonb refuses): find it row by row instead of retrying the same batch forever.
            self._rollback(conn)
            self._write_row_by_row(conn, rows, cursor, days)
        except psycopg.Error as exc:
            self._rollback(conn)
            raise SinkDown(
                "connection" if conn.broken or isinstance(exc, psycopg.OperationalError) else "write",
                f"PostgreSQL write of {len(rows)} rows failed: {_first_line(exc)}",
            ) from None
        self._days |= days
        self.durable = cursor

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
