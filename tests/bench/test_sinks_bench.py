"""``python -m bench.sinks`` end to end on a small store: real private VictoriaMetrics servers
(one for the raw write, stopped before the sink's own starts) and the lake, every figure
reported and consistent with its definition."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(180)
def test_bench_sinks_reports_raw_sink_and_floor_rates_for_victoria_and_the_lake() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.sinks", "--rows", "2000", "--devices", "10", "--sinks=victoria,lake"],
        capture_output=True,
        text=True,
        timeout=170,
        check=True,
    )
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["rows"] == 2000 and set(doc["results"]) == {"victoria", "lake"}
    for name, r in doc["results"].items():
        assert r["raw_rows_per_s"] > 0 and r["sink_rows_per_s"] > 0 and r["floor_rows_per_s"] > 0, name
        assert r["ratio"] == pytest.approx(r["sink_rows_per_s"] / r["raw_rows_per_s"]), name
        assert r["floor_ratio"] == pytest.approx(r["floor_rows_per_s"] / r["raw_rows_per_s"]), name
    assert out.stdout.splitlines()[0].startswith("sink ")


def test_bench_sinks_refuses_an_unknown_sink() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.sinks", "--rows", "1000", "--sinks", "kafka"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "unknown sink 'kafka'" in out.stderr
