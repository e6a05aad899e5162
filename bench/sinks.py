"""``python -m bench.sinks``: each storage sink against its library's raw bulk write of the same rows.

One run: a SQLite store (contract 5) is filled with ``--rows`` rows of ``--devices``
devices (all in a device registry); private PostgreSQL and VictoriaMetrics servers
start on loopback.  Per sink, in the same run:

* **raw**: the destination's own bulk path on the same, already enriched rows --
  PostgreSQL: one ``COPY`` per 5000 rows straight into an identical partitioned
  table (no staging, no ON CONFLICT, no cursor), VictoriaMetrics: the same line
  protocol lines POSTed to ``/write`` 5000 at a time, the lake: ``pyarrow.parquet.
  write_table`` of each partition's rows (one file each, no fsync/rename);
* **sink**: the sink's tail loop (``node.storage.tail.Tail``, in this process) from
  cursor 0 until every row is durable: SQLite read, enrichment, JSON, the write and
  its cursor.

and, just before each sink:

* **floor**: only reading the same rows out of the SQLite store in Python -- the
  ``StoreLog.read`` loop of the tail, ``BATCH`` rows at a time from cursor 0, nothing
  done with them.  No sink that tails the store in Python can be faster than that,
  so ``floor / raw`` is the highest ``sink / raw`` a sink could reach if everything
  it does besides reading were free (or hidden behind the read).  The VictoriaMetrics
  and lake sinks read in columns in C (``StoreLog.read_columns``) where available, so
  this Python floor bounds only the PostgreSQL sink.

It prints rows/s for all three, ``sink / raw`` and ``floor / raw``, as a table and one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.servers.storage import PgServer, VmServer
from node.record import Record
from node.registry import Registry, RegistryWatcher
from node.sinks.sqlite import SqliteSink
from node.storage.enrich import Row, enrich, labels_json
from node.storage.source import StoreLog
from node.storage.tail import Tail, TailSink

BATCH = 5000


def fill_store(path: Path, rows: int, devices: int) -> None:
    sink = SqliteSink(path, "process")
    sink.open()
    now = time.time()
    seqs = [0] * devices
    cursor = 0
    for start in range(0, rows, 2000):
        records = []
        for i in range(start, min(rows, start + 2000)):
            d = i % devices
            seq = seqs[d]
            seqs[d] += 1
            data = {"temp": 20 + (i % 100) / 10, "hum": 40.5, "battery": 3.7, "status": "ok"}
            records.append(Record(f"dev{d}", seq, now - 3600 + i * 0.001, now - 60 + i * 1e-5, data))
        cursor += 1
        sink.write(records, b"\x02" * 16, cursor)
    sink.close()


def write_registry(path: Path, devices: int) -> None:
    lines = ["device_id,type,class,region,site,lat,lon"]
    for d in range(devices):
        kind = ("thermo", "meter", "tracker")[d % 3]
        lines.append(f"dev{d},{kind},c{d % 4},r{d % 5},s{d},{45 + d % 10 / 10},{2 + d % 7 / 10}")
    path.write_text("\n".join(lines) + "\n")


def all_rows(store: Path, registry: Registry) -> list[Row]:
    log = StoreLog(store)
    assert log.open()
    raw = log.read(0, 10**9)
    log.close()
    return enrich(raw, registry)[0]


def run_sink(sink: TailSink, store: Path, registry: Path, total: int) -> float:
    tail = Tail(sink, StoreLog(store), RegistryWatcher(registry), BATCH, logging.getLogger("bench.sinks"))
    started = time.perf_counter()
    deadline = time.monotonic() + 600
    while sink.durable < total and time.monotonic() < deadline:
        wait = tail.step()
        if sink.durable < total and wait:
            sink.flush()  # the lake: everything read is buffered; write it now, do not wait for the timer
    elapsed = time.perf_counter() - started
    tail.close()
    if sink.durable < total:
        raise RuntimeError(f"{sink.name}: only {sink.durable} of {total} rows after 600 s")
    return elapsed


def read_floor(store: Path) -> float:
    """Seconds to read every row of the store the way the tail does, and nothing else."""
    log = StoreLog(store)
    assert log.open()
    started = time.perf_counter()
    after = 0
    while raw := log.read(after, BATCH):
        after = raw[-1][0]
    elapsed = time.perf_counter() - started
    log.close()
    return elapsed


# ---------------------------------------------------------------------- raw baselines
def rows_table(rows: list[Row]) -> Any:
    """The lake's columns built from enriched rows, one Python list per column (the raw lake
    baseline's own way to Arrow; the sink builds them column-wise from the store's columns)."""
    import pyarrow as pa

    from node.storage.lake import SCHEMA

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


def raw_postgres(dsn: str, rows: list[Row]) -> float:
    import psycopg

    from node.storage import postgres as pgsink

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_raw CASCADE")
        conn.execute(pgsink._SCHEMA[0].replace(pgsink.TABLE, "bench_raw"))
        for day in sorted({int(r.received_at // 86400) for r in rows}):
            conn.execute(pgsink._partition_ddl(day).replace(pgsink.TABLE, "bench_raw"))
    cols = "device_id, seq, ts, received_at, type, class, region, site, lat, lon, geohash, labels, data"
    import datetime as dt

    with psycopg.connect(dsn) as conn:
        started = time.perf_counter()
        for start in range(0, len(rows), BATCH):
            with conn.cursor() as cur, cur.copy(f"COPY bench_raw ({cols}) FROM STDIN") as copy:
                for r in rows[start : start + BATCH]:
                    c = r.ctx
                    copy.write_row(
                        (
                            r.device_id,
                            r.seq,
                            r.ts,
                            dt.datetime.fromtimestamp(r.received_at, dt.UTC),
                            c.type,
                            c.class_,
                            c.region,
                            c.site,
                            c.lat,
                            c.lon,
                            c.geohash,
                            labels_json(c),
                            r.data_json,
                        )
                    )
            conn.commit()
        return time.perf_counter() - started


def raw_victoria(url: str, rows: list[Row]) -> float:
    from node.storage.victoria import line

    bodies = [
        ("\n".join(line(r)[0] for r in rows[start : start + BATCH]) + "\n").encode()
        for start in range(0, len(rows), BATCH)
    ]
    started = time.perf_counter()
    for body in bodies:
        req = urllib.request.Request(f"{url}/write?precision=ms", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
    return time.perf_counter() - started


def raw_lake(root: Path, rows: list[Row]) -> float:
    import pyarrow.parquet as pq

    from node.storage.lake import partition_value

    parts: dict[str, list[Row]] = {}
    for r in rows:
        parts.setdefault(partition_value(r.ctx.type), []).append(r)
    started = time.perf_counter()
    for kind, part in parts.items():
        directory = root / f"type={kind}"
        directory.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows_table(part), directory / "raw.parquet", compression="zstd")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sinks", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--sinks", default="postgres,victoria,lake")
    args = parser.parse_args(argv)
    if not 1000 <= args.rows <= 10_000_000 or not 1 <= args.devices <= 100_000:
        parser.error("--rows must be 1000..10000000, --devices 1..100000")
    for name in args.sinks.split(","):
        if name not in ("postgres", "victoria", "lake"):
            parser.error(f"unknown sink {name!r} (known: postgres, victoria, lake)")
    logging.basicConfig(level=logging.WARNING)
    from node.storage.lake import LakeSink
    from node.storage.postgres import PostgresSink
    from node.storage.victoria import VictoriaSink

    root = Path(tempfile.mkdtemp(prefix="iotnode-bench-sinks-"))
    servers: list[Any] = []
    results: dict[str, dict[str, float]] = {}
    try:
        store = root / "store.sqlite3"
        registry = root / "devices.csv"
        write_registry(registry, args.devices)
        fill_store(store, args.rows, args.devices)
        rows = all_rows(store, Registry.load(registry))
        for name in args.sinks.split(","):
            if name == "postgres":
                pg_root = Path(tempfile.mkdtemp(prefix="iotnode-bench-pg-"))
                pg = PgServer(pg_root)
                pg.start()
                servers.append((pg, pg_root))
                raw = raw_postgres(pg.dsn, rows)
                floor = read_floor(store)
                sink_s = run_sink(PostgresSink(pg.dsn, "bench"), store, registry, args.rows)
            elif name == "victoria":
                # The raw write and the sink each get a fresh, empty VictoriaMetrics, and the raw
                # one is stopped before the sink starts: VictoriaMetrics merges what it ingested
                # in the background for seconds after acknowledging it, and on 2 shared cores that
                # work (2-5 us a row measured) would otherwise be charged to whichever runs second.
                raw_root = Path(tempfile.mkdtemp(prefix="iotnode-bench-vm-raw-"))
                vm_raw = VmServer(raw_root)
                vm_raw.start()
                try:
                    raw = raw_victoria(vm_raw.url, rows)
                finally:
                    vm_raw.stop()
                    shutil.rmtree(raw_root, ignore_errors=True)
                vm_root = Path(tempfile.mkdtemp(prefix="iotnode-bench-vm-"))
                vm = VmServer(vm_root)
                vm.start()
                servers.append((vm, vm_root))
                floor = read_floor(store)
                sink_s = run_sink(VictoriaSink(vm.url, root / "victoria.cursor"), store, registry, args.rows)
            elif name == "lake":
                raw = raw_lake(root / "raw-lake", rows)
                floor = read_floor(store)
                sink = LakeSink(root / "lake", flush_rows=args.rows + 1, flush_seconds=3600)
                sink_s = run_sink(sink, store, registry, args.rows)
            else:
                parser.error(f"unknown sink {name!r}")
            results[name] = {
                "raw_rows_per_s": args.rows / raw,
                "sink_rows_per_s": args.rows / sink_s,
                "floor_rows_per_s": args.rows / floor,
                "ratio": raw / sink_s,
                "floor_ratio": raw / floor,
            }
    finally:
        for server, server_root in servers:
            server.stop()
            shutil.rmtree(server_root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"{'sink':10} {'raw rows/s':>12} {'sink rows/s':>12} {'floor rows/s':>13} {'sink/raw':>9}"
        f" {'floor/raw':>10}   ({args.rows} rows)"
    )
    for name, r in results.items():
        print(
            f"{name:10} {r['raw_rows_per_s']:12.0f} {r['sink_rows_per_s']:12.0f}"
            f" {r['floor_rows_per_s']:13.0f} {r['ratio']:9.2f} {r['floor_ratio']:10.2f}"
        )
    print(json.dumps({"rows": args.rows, "devices": args.devices, "results": results}))


if __name__ == "__main__":
    main()
