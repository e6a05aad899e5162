"""The lake sink's Arrow build and partitioning, in process, on a real file system.

The sink builds each batch column by column from the store's rows (``lake._table``);
a file must hold exactly what the row-by-row build of the first version held, in the
partition of the UTC day of the ``received_at`` it stores, with its types.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from bench.sinks import rows_table as reference  # the first version's build: a Python list per column
from node.registry import DeviceContext, Registry
from node.storage.enrich import batch_of, enrich
from node.storage.lake import SCHEMA, LakeSink, partition_value
from node.storage.source import RawRow

MIDNIGHT = 1_796_083_200.0  # 2026-12-01 00:00:00 UTC


def registry() -> Registry:
    return Registry(
        {
            "t1": DeviceContext(
                "t1", "thermo", "env", "eu-west", "paris", 48.8566, 2.3522, "u09tv", {"floor": "3"}
            ),
            "m1": DeviceContext("m1", "meter/v2 é", "energy", "us", "nyc", None, None, "", {}),
            "d1": DeviceContext("d1", ".hidden", "", "", "", 1.5, -2.5, "s00tw", {"k\\": "v\t\n"}),
        }
    )


def raw_rows(first: int, count: int) -> list[RawRow]:
    rng = random.Random(first)
    edge = [MIDNIGHT - 0.0000004, MIDNIGHT - 0.0000006, MIDNIGHT - 1e-9, MIDNIGHT, MIDNIGHT - 86400.25]
    devices = ["t1", "m1", "d1", "ghost"]
    out: list[RawRow] = []
    for i in range(count):
        at = edge[i] if i < len(edge) else MIDNIGHT + rng.uniform(-3 * 3600, 3 * 3600)
        ts = None if i % 4 == 1 else at - rng.random()
        data = json.dumps({"v": i, "s": "é\\\t", "n": None}, ensure_ascii=False, separators=(",", ":"))
        out.append((first + i, devices[i % 4], first + i, ts, at, data))
    return out


def test_lake_files_hold_the_rows_of_the_row_by_row_build_partitioned_by_utc_day_and_type(
    tmp_path: Path,
) -> None:
    reg = registry()
    raws = [raw_rows(1, 700), raw_rows(701, 300)]
    sink = LakeSink(tmp_path, flush_rows=10**6, flush_seconds=3600)
    sink.open()
    for raw in raws:
        sink.write(batch_of(raw, reg))
    assert sink.durable == 0 and not list(tmp_path.rglob("*.parquet"))  # buffered, not yet committed
    sink.flush()
    assert sink.durable == 1000
    assert not list(tmp_path.rglob("*.tmp"))

    files = sorted(tmp_path.glob("date=*/type=*/*.parquet"))
    parts = {(f.parent.parent.name, f.parent.name) for f in files}
    assert parts == {
        (f"date={day}", f"type={kind}")
        for day in ("2026-11-29", "2026-11-30", "2026-12-01")
        for kind in ("thermo", "meter_v2__", "_.hidden", "unknown")
    } - {("date=2026-11-29", "type=meter_v2__"), ("date=2026-11-29", "type=_.hidden")} - {
        ("date=2026-11-29", "type=unknown")
    }
    tables = []
    for f in files:
        table = pq.read_table(f, partitioning=None)
        assert table.schema == SCHEMA  # the same types as before, no partition columns in the file
        day = f.parent.parent.name.removeprefix("date=")
        kind = f.parent.name.removeprefix("type=")
        assert {t.astimezone(dt.UTC).strftime("%Y-%m-%d") for t in table["received_at"].to_pylist()} == {day}
        rowids = table["store_rowid"].to_pylist()
        assert rowids == sorted(rowids)  # store order within a file
        assert {partition_value(reg.context(d).type) for d in table["device_id"].to_pylist()} == {kind}
        tables.append(table)

    rows = enrich([r for raw in raws for r in raw], reg)[0]
    got = pa.concat_tables(tables).sort_by("store_rowid")
    assert got.equals(reference(rows))
    # the row 0.4 us before midnight is stored as midnight, so it is in the next day's partition
    midnight = got.filter(pa.compute.equal(got["store_rowid"], 1))["received_at"].to_pylist()
    assert midnight == [dt.datetime(2026, 12, 1, tzinfo=dt.UTC)]

    counted = duckdb.sql(
        f"SELECT count(*), count(DISTINCT (device_id, seq)), min(date), max(date)"
        f" FROM read_parquet('{tmp_path}/*/*/*.parquet', hive_partitioning = true)"
    ).fetchall()
    assert counted == [(1000, 1000, dt.date(2026, 11, 29), dt.date(2026, 12, 1))]
    sink.close()


def test_a_reopened_lake_resumes_after_its_committed_cursor_and_drops_what_was_buffered(
    tmp_path: Path,
) -> None:
    reg = registry()
    sink = LakeSink(tmp_path, flush_rows=500, flush_seconds=3600)
    sink.open()
    sink.write(batch_of(raw_rows(1, 600), reg))  # over flush_rows: committed
    sink.write(batch_of(raw_rows(601, 100), reg))  # buffered only
    assert sink.durable == 600
    sink.close()
    again = LakeSink(tmp_path, flush_rows=500, flush_seconds=3600)
    again.open()
    assert again.cursor() == 600
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{tmp_path}/*/*/*.parquet')").fetchall()
    assert n == [(600,)]
