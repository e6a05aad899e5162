"""The PostgreSQL sink's write paths, in process, against the real server.

A batch goes by ``COPY`` straight into the table (the COPY text built by
``copy_text``); a batch with rows already there goes again through the staging
table and ``ON CONFLICT DO NOTHING``.  Both paths must store a row identically --
the same ``received_at`` (it is in the primary key: a different microsecond would
be a second row), the same escaped text, the same jsonb -- and the cursor must
commit with the rows.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from node.registry import DeviceContext, Registry
from node.storage import postgres as pgsink
from node.storage.enrich import Batch, batch_of
from node.storage.postgres import PostgresSink, jsonb_text, pg_day, pg_timestamp
from node.storage.source import RawRow, StoreLog
from tests.storage.conftest import PgServer, StoreFiller

MIDNIGHT = 1_796_083_200.0  # 2026-12-01 00:00:00 UTC
ODD = "\\ \t\n\r,=\"'\\N|\\."  # every character COPY text or the line protocol treats specially


@pytest.fixture
def prefix() -> str:
    return f"pgw{random.randrange(1 << 30):x}-"


@pytest.fixture
def sink(pg: PgServer, prefix: str) -> Iterator[PostgresSink]:
    s = PostgresSink(pg.dsn, prefix + "source")
    s.open()
    s.durable = s.cursor()
    yield s
    s.close()


def registry_of(prefix: str) -> Registry:
    odd = DeviceContext(
        f"{prefix}odd{ODD}",
        f"ty{ODD}",
        f"cl{ODD}",
        f"re{ODD}",
        f"si{ODD}\x00",
        45.5,
        -2.25,
        "u0abc",
        {f"k{ODD}": f"v{ODD}", "nul": "a\x00b", "uni": "é€😀"},
    )
    plain = DeviceContext(f"{prefix}plain", "thermo", "env", "eu-west", "paris", None, None, "")
    return Registry({c.device_id: c for c in (odd, plain)})


def odd_rows(prefix: str, first_rowid: int = 1) -> list[RawRow]:
    """Rows a store may hold: odd device ids, JSON with escapes, no ts, times around a UTC midnight."""
    datas = [
        '{"v":1,"s":"t"}',
        '{"s":"back\\\\slash \\"quoted\\" tab\\t nl\\n cr\\r"}',
        '{"s":"a\\u0000b"}',  # a NUL escape: jsonb refuses it, U+FFFD instead
        '{"s":"\\\\u0000"}',  # the text backslash-u0000: stays as it is
        '{"nested":{"x":[1,2.5,null,true]},"é":"€😀"}',
        "[1,2,3]",
        '"just a string"',
        "12345678901234567890123",  # a number bigger than any int64
    ]
    times = [MIDNIGHT - 0.0000004, MIDNIGHT - 0.0000006, MIDNIGHT - 1e-9, MIDNIGHT, MIDNIGHT + 0.5]
    devices = [f"{prefix}odd{ODD}", f"{prefix}plain", f"{prefix}ghost\\N"]
    rows: list[RawRow] = []
    rng = random.Random(7)
    for i in range(60):
        at = times[i] if i < len(times) else MIDNIGHT - 3600 + rng.random() * 7200
        ts = None if i % 3 == 0 else at - rng.random() * 100
        rows.append((first_rowid + i, devices[i % 3], i, ts, at, datas[i % len(datas)]))
    return rows


def stored(pg: PgServer, prefix: str) -> list[tuple[Any, ...]]:
    return pg.query(
        "SELECT device_id, seq, ts, received_at, type, class, region, site, lat, lon, geohash, labels, data,"
        " tableoid::regclass::text FROM iotnode_messages WHERE device_id LIKE %s"
        ' ORDER BY device_id COLLATE "C", seq',
        (prefix + "%",),
    )


def cursor_of(pg: PgServer, source: str) -> int | None:
    got = pg.query("SELECT position FROM iotnode_sink_cursor WHERE source = %s", (source,))
    return None if not got else int(got[0][0])


def expected(batch: Batch) -> list[tuple[Any, ...]]:
    """What the table must hold for each row: the store's values, the context, jsonb of data."""
    out = []
    for r in batch.rows:
        c = r.ctx
        day = pg_timestamp(r.received_at)
        labels = json.loads(jsonb_text(json.dumps(dict(c.labels))))
        out.append(
            (
                r.device_id,
                r.seq,
                r.ts,
                day,
                c.type,
                c.class_,
                c.region,
                c.site.replace("\x00", "\ufffd"),
                c.lat,
                c.lon,
                c.geohash,
                labels,
                json.loads(jsonb_text(r.data_json)),
                f"iotnode_messages_{day:%Y%m%d}",
            )
        )
    return sorted(out, key=lambda row: (row[0], row[1]))


def test_pg_timestamp_and_day_match_postgresql_to_timestamp(pg: PgServer) -> None:
    rng = random.Random(1)
    seconds = [MIDNIGHT + d for d in (-0.0000005, -0.0000004, -0.0000006, -1e-9, 0.0, 0.0000005, 0.0000015)]
    seconds += [rng.uniform(0, 4e9) for _ in range(2000)] + [
        round(rng.uniform(1e9, 2e9), 6) for _ in range(500)
    ]
    got = pg.query(
        "SELECT to_timestamp(s), (extract(epoch FROM date_trunc('day', to_timestamp(s) AT TIME ZONE 'UTC'))"
        " / 86400)::int FROM unnest(%s::float8[]) WITH ORDINALITY AS t(s, i) ORDER BY i",
        (seconds,),
    )
    assert [(pg_timestamp(s), pg_day(s)) for s in seconds] == [(ts, day) for ts, day in got]
    assert pg_day(MIDNIGHT - 0.0000004) == MIDNIGHT // 86400  # rounded up to midnight: the next day
    assert pg_day(MIDNIGHT - 0.0000006) == MIDNIGHT // 86400 - 1


def test_jsonb_text_replaces_nul_escapes_only() -> None:
    assert jsonb_text('{"s":"a\\u0000b","\\u0000":1}') == '{"s":"a\\ufffdb","\\ufffd":1}'
    assert jsonb_text('{"s":"\\\\u0000"}') == '{"s":"\\\\u0000"}'  # backslash, then the text u0000
    assert jsonb_text('{"s":"\\\\\\u0000"}') == '{"s":"\\\\\\ufffd"}'  # a backslash, then NUL
    assert jsonb_text('{"s":"\\u00001"}') == '{"s":"\\ufffd1"}'
    plain = '{"s":"\\u0001"}'
    assert jsonb_text(plain) is plain


def test_direct_copy_escapes_every_field_and_stores_what_the_staging_path_stores(
    pg: PgServer, sink: PostgresSink, prefix: str
) -> None:
    batch = batch_of(odd_rows(prefix), registry_of(prefix))
    sink.write(batch)
    direct = stored(pg, prefix)
    assert direct == expected(batch)
    assert {r[13] for r in direct} == {"iotnode_messages_20261130", "iotnode_messages_20261201"}
    assert cursor_of(pg, sink.source) == sink.durable == batch.last

    # The same batch the old way (staging table + INSERT ... SELECT, to_timestamp()): the same rows.
    pg.query("DELETE FROM iotnode_messages WHERE device_id LIKE %s RETURNING 1", (prefix + "%",))
    conn = sink._need()
    sink._write_staged(conn, batch.rows, set())
    conn.commit()
    assert stored(pg, prefix) == direct


def test_a_batch_with_rows_already_there_goes_the_tolerant_way_once_each_with_its_cursor(
    pg: PgServer, sink: PostgresSink, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = registry_of(prefix)
    rows = odd_rows(prefix)
    other = PostgresSink(pg.dsn, prefix + "other")  # e.g. a cursor reset by hand, or a second writer
    other.open()
    other.write(batch_of(rows[10:25:2], registry))  # some rows of the batch, near midnight too
    other.write(batch_of(rows[:3], registry))
    other.close()
    before = len(stored(pg, prefix))
    assert before == 11
    with caplog.at_level(logging.WARNING, logger="node.storage.postgres"):
        sink.write(batch_of(rows, registry))
    assert "in PostgreSQL already" in caplog.text
    got = stored(pg, prefix)
    assert got == expected(batch_of(rows, registry))  # every row once, received_at as on the direct path
    assert cursor_of(pg, sink.source) == sink.durable == rows[-1][0]

    # The next batch, with nothing there yet, goes straight in again.
    caplog.clear()
    more = [(61 + i, f"{prefix}plain", 100 + i, None, MIDNIGHT + i, '{"v":2}') for i in range(5)]
    with caplog.at_level(logging.WARNING, logger="node.storage.postgres"):
        sink.write(batch_of(more, registry))
    assert "already" not in caplog.text
    assert len(stored(pg, prefix)) == len(rows) + 5
    assert cursor_of(pg, sink.source) == 65


def test_rows_and_cursor_commit_together_a_batch_failing_after_its_copy_leaves_no_row(
    pg: PgServer, sink: PostgresSink, prefix: str
) -> None:
    registry = registry_of(prefix)
    sink.write(batch_of(odd_rows(prefix)[:5], registry))
    assert cursor_of(pg, sink.source) == 5
    conn = sink._need()
    with conn.cursor() as cur:
        cur.execute("SET lock_timeout = '300ms'")
    conn.commit()
    with psycopg.connect(pg.dsn) as blocker:  # the cursor upsert, after the COPY, cannot proceed
        blocker.execute("LOCK TABLE iotnode_sink_cursor IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(pgsink.SinkDown, match="lock timeout"):
            sink.write(batch_of(odd_rows(prefix)[5:], registry))
    assert cursor_of(pg, sink.source) == sink.durable == 5
    assert len(stored(pg, prefix)) == 5  # the COPY of the failed batch was rolled back with it
    sink.write(batch_of(odd_rows(prefix)[5:], registry))  # and goes again, straight in
    assert len(stored(pg, prefix)) == 60 and cursor_of(pg, sink.source) == 60


def test_copy_text_is_one_line_per_row_with_thirteen_fields(prefix: str) -> None:
    batch = batch_of(odd_rows(prefix), registry_of(prefix))
    text = "".join(pgsink.copy_text(batch, chunk_rows=7))
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) == batch.count + 1
    assert all(line.count("\t") == 12 for line in lines[:-1])
    assert "\x00" not in text and "\r" not in text


def test_the_next_batch_read_during_the_copy_is_the_one_the_tail_asks_for_or_dropped(
    pg: PgServer, sink: PostgresSink, prefix: str, tmp_path: Path
) -> None:
    filler = StoreFiller(tmp_path / "store.sqlite3", devices=3, prefix=prefix)
    filler.write(250)
    source = StoreLog(tmp_path / "store.sqlite3")
    assert source.open()

    def registry_now() -> Registry:
        return Registry({f"{prefix}0": DeviceContext(f"{prefix}0", "thermo", "", "", "", None, None, "")})

    registry = registry_now()
    first = sink.read(source, 0, 100, registry)
    assert first is not None and (first.first, first.last) == (1, 100)
    sink.write(first)
    ahead = sink._ahead
    assert ahead is not None and ahead[0] == 100 and (ahead[2].first, ahead[2].last) == (101, 200)
    second = sink.read(source, 100, 100, registry)
    assert second is ahead[2]  # read while the server was busy: no second read
    sink.write(second)
    assert sink.read(source, 150, 100, registry) is not None and sink._ahead is None  # another position
    sink._read_ahead(200)
    other = registry_now()  # a reloaded registry: the batch read with the old one is dropped
    third = sink.read(source, 200, 100, other)
    assert third is not None and third.contexts[f"{prefix}0"] is other.get(f"{prefix}0")
    sink.write(third)
    assert cursor_of(pg, sink.source) == 250
    got = pg.query("SELECT count(*) FROM iotnode_messages WHERE device_id LIKE %s", (prefix + "%",))
    assert got == [(250,)]
    source.close()
    filler.close()
