"""``python -m bench e2e --sinks`` against real small nodes (one with SQLite only, one
with PostgreSQL, VictoriaMetrics and the Parquet lake on, private servers) and a real
no-op front: the ratio fields are reported and every destination, counted from the
destination itself, holds exactly the rows of the SQLite store.  Bounded: 2 s of load."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from bench import e2e, proto
from bench.loadgen import Conn, Gen
from bench.servers.storage import PG_BIN, VM_BIN
from tests.bench import e2e_args


@pytest.mark.timeout(120)
def test_e2e_sinks_reports_ratios_and_every_sink_holds_exactly_the_stored_rows(tmp_path: Path) -> None:
    if not (PG_BIN / "postgres").exists() or not Path(VM_BIN).exists():
        pytest.skip("PostgreSQL or VictoriaMetrics not installed (Debian: postgresql, victoria-metrics)")
    args = e2e_args(
        tmp_path, "-n", "8", "--devices", "10", "--rates", "100", "--latency-duration", "1", "--sinks"
    )
    started = time.monotonic()
    # A short work directory: the node's ipc:// socket paths under it must stay within
    # 107 bytes, which tmp_path (pytest-of-root/pytest-NNN/<test name>_0/...) can exceed.
    work = Path(tempfile.mkdtemp(prefix="e2es-", dir="/tmp"))
    try:
        doc = e2e.run(args, work, "test", progress=None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert time.monotonic() - started < 60

    (row,) = doc["throughput"]
    assert doc["mode"] == "sinks" and doc["latency"] == []
    noop = row["noop_acked_msg_s"]
    assert noop > 0 and row["sqlite_stored_msg_s"] > 0 and row["acked_msg_s"] > 0, row
    for key in ("sqlite_stored", "acked", "stored", "postgres", "victoria", "lake"):
        rate = row[f"{key}_msg_s" if key in ("sqlite_stored", "acked", "stored") else f"{key}_rows_s"]
        ratio = row[f"{key}_vs_noop"]
        assert rate > 0 and ratio == round(rate / noop, 3), (key, row)
    slowest = min(row["stored_msg_s"], row["postgres_rows_s"], row["victoria_rows_s"], row["lake_rows_s"])
    assert row["all_sinks_vs_noop"] == round(slowest / noop, 3)
    # Drained, then counted in each destination: exactly the store's rows, each once.
    assert row["drained"] is True and row["stores_exact"] is True, row
    check = doc["runs"][0]["check"]
    rows = check["sqlite_rows"]
    assert rows == row["store_rows"] >= doc["runs"][0]["iotnode+sinks"]["acked"] > 0
    for sink in e2e.SINKS:
        assert check[f"{sink}_rows_total"] == check[f"{sink}_distinct"] == rows, check
        assert row[f"{sink}_lag_end"] is not None and row[f"{sink}_drain_s"] is not None
    s = doc["summary"]
    assert s["all_sinks_vs_noop_median"] == row["all_sinks_vs_noop"] and s["stores_exact"] is True
    # The node's own processes ran from this tree, beside PostgreSQL and VictoriaMetrics.
    cpu = row["target_cpu_s_by_role"]
    assert {"node.workers.postgres", "node.workers.victoria", "node.workers.lake", "victoria-metrics"} <= set(
        cpu
    ), cpu
    assert doc["tree"] == str(Path(e2e.__file__).resolve().parent.parent)
    saved = json.loads(Path(doc["path"]).read_text())
    assert saved["throughput"] == doc["throughput"]


def test_sink_rates_use_the_scrapes_inside_the_window() -> None:
    result = {
        "scenario": {"duration": 4.0},
        "stage_counts": [
            {"t": 0.0, "sink_rows:postgres": 0.0, "sink_rows:victoria": 10.0, "sink_rows:lake": 0.0},
            {"t": 4.0, "sink_rows:postgres": 400.0, "sink_rows:victoria": 410.0, "sink_rows:lake": 200.0},
            {"t": 9.0, "sink_rows:postgres": 900.0, "sink_rows:victoria": 900.0, "sink_rows:lake": 900.0},
        ],
    }
    assert e2e.sink_rates(result) == {
        "postgres_rows": 400,
        "postgres_rows_s": 100.0,
        "victoria_rows": 400,
        "victoria_rows_s": 100.0,
        "lake_rows": 200,
        "lake_rows_s": 50.0,
    }
    with pytest.raises(proto.BenchError, match="postgres"):
        e2e.sink_rates({"scenario": {"duration": 4.0}, "stage_counts": [{"t": 0.0, "stored": 1.0}]})


def test_distinct_ts_gives_each_message_of_a_connection_its_own_millisecond() -> None:
    spec = {"kind": "iotnode", "mode": "max", "distinct_ts": True}
    conn = Conn(Gen(spec), 0, "dev", "", "127.0.0.1")
    stamps = [round(conn._ts() * 1000) for _ in range(500)]  # far more than one per ms
    assert stamps == sorted(set(stamps)) and len(stamps) == 500
    assert abs(stamps[-1] / 1000 - time.time()) < 1.0
    plain = Conn(Gen({**spec, "distinct_ts": False}), 0, "dev", "", "127.0.0.1")
    assert abs(plain._ts() - time.time()) < 0.1


def test_sinks_mode_needs_no_latency_rates() -> None:
    args = argparse.Namespace(
        rounds=1, payload=64, encoding="msgpack", processes=1, connections=4, window=4, duration=1.0
    )
    args.sinks = True
    thr, lat = e2e.scenarios(args)
    assert lat == [] and thr.distinct_ts is True
