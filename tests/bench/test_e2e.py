"""``python -m bench e2e`` against a real small node (honcho, every stage, SQLite
store, fanout) and a real no-op front: stored counts and fanout latency are reported
and agree with what the generator sent.  Bounded: a few seconds of load."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from bench import e2e, proto
from node.front.metrics import FLUSH_INTERVAL, RENDER_TTL
from tests.bench import e2e_args


@pytest.mark.timeout(120)
def test_e2e_reports_stored_rate_and_fanout_latency_against_a_small_node(tmp_path: Path) -> None:
    args = e2e_args(tmp_path, "-n", "10", "--devices", "50", "--rates", "200", "--latency-duration", "2")
    args.client_during_throughput = True
    started = time.monotonic()
    doc = e2e.run(args, tmp_path / "work", "test", progress=None)
    assert time.monotonic() - started < 60

    (thr,) = doc["throughput"]
    assert thr["acked_msg_s"] > 0 and thr["noop_acked_msg_s"] > 0
    assert thr["stored_msg_s"] > 0 and thr["stored"] > 0, thr
    # The store cannot have committed more than the front acked, over the same window; the
    # web's /metrics lag by up to FLUSH_INTERVAL (workers flush their counters once a
    # second) + RENDER_TTL (the merged output is rendered at most once a second, issue 14).
    lag = FLUSH_INTERVAL + RENDER_TTL
    node_acked = thr["node_acked_msg_s"] * thr["window_s"]
    assert thr["stored"] <= 1.2 * node_acked + lag * thr["acked_msg_s"], thr
    assert thr["stored_vs_noop"] == round(thr["stored_msg_s"] / thr["noop_acked_msg_s"], 3)
    assert (
        thr["drained"] is True and thr["ingress_depth_end"] is not None and thr["fanin_depth_end"] is not None
    )
    # The client app followed the throughput run too (best effort: the fanout may drop for it).
    assert (
        0 < thr["fanout_frames"] <= doc["runs"][0]["drain"]["counts"]["stored"] and thr["fanout_p99_ms"] > 0
    ), thr

    (lat,) = doc["latency"]
    assert lat["offered_msg_s"] == 200.0 and lat["devices"] == 50
    assert 390 <= lat["acked"] <= 410, lat
    # At 200 msg/s nothing is dropped for the client: one frame per acked message, in order.
    assert lat["fanout_frames"] == lat["acked"] and lat["delivered"] == 1.0, lat
    assert lat["out_of_order"] == 0
    assert 0 < lat["fanout_p50_ms"] <= lat["fanout_p99_ms"] <= lat["fanout_max_ms"] < 10_000, lat

    saved = json.loads(Path(doc["path"]).read_text())
    assert saved["throughput"] == doc["throughput"] and saved["latency"] == doc["latency"]


def test_e2e_drained_store_counter_matches_the_rows_in_sqlite(tmp_path: Path) -> None:
    # stored_rate reads the store's counter; check it against the rows on disk of a
    # drained node: the same number the contract's table holds.
    options = ["-n", "4", "-w", "4", "-d", "1", "--devices", "10", "--rates", "50", "--latency-duration", "1"]
    args = e2e_args(tmp_path, *options, "--encoding", "json")
    doc = e2e.run(args, tmp_path / "work", "test", progress=None)
    thr, lat = doc["runs"]
    assert thr["iotnode"]["acked"] > 0 and lat["iotnode"]["acked"] > 0
    db = tmp_path / "work" / "iotnode" / "data" / "store.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    # Drained: the store's counter is the rows on disk, between the front's acks and receipts ...
    assert lat["drain"]["drained"] is True
    counts = lat["drain"]["counts"]
    assert counts["acked"] <= rows == counts["stored"] <= counts["received"], counts
    # ... and every message the generator saw acked is among them (a closed-loop run
    # may end with messages persisted whose ack the generator did not wait for).
    assert rows >= thr["iotnode"]["acked"] + lat["iotnode"]["acked"]


def test_stored_rate_uses_the_scrapes_inside_the_window() -> None:
    result = {
        "scenario": {"duration": 4.0},
        "stage_counts": [
            {"t": 0.0, "stored": 100.0, "acked": 150.0},
            {"t": 2.0, "stored": 300.0, "acked": 400.0},
            {"t": 4.0, "stored": 500.0, "acked": 650.0},
            {"t": 9.0, "stored": 900.0, "acked": 900.0},  # drain phase: not in the window
        ],
    }
    out = e2e.stored_rate(result)
    assert out == {"window_s": 4.0, "stored": 400, "stored_msg_s": 100.0, "node_acked_msg_s": 125.0}


def test_stored_rate_without_two_scrapes_names_what_it_got() -> None:
    with pytest.raises(proto.BenchError, match="fewer than two scrapes"):
        e2e.stored_rate({"scenario": {"duration": 4.0}, "stage_counts": [{"t": 0.0, "stored": 1.0}]})


@pytest.mark.parametrize("bad", ["1000,fast", "0", "-5"])
def test_bad_rates_are_refused_with_the_offending_value(bad: str) -> None:
    with pytest.raises(proto.BenchError, match="--rates") as info:
        e2e.parse_rates(bad)
    assert repr(bad.split(",")[-1]) in str(info.value)
