"""bench idle against a real whole node: the report has every number it promises."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import REPO


def test_bench_idle_reports_cpu_per_process_and_wake_latencies() -> None:
    argv = ["idle", "--devices", "2", "--idle", "1", "--wakes", "2", "--gap", "0.2"]
    done = subprocess.run(
        [sys.executable, "-m", "bench", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    (result,) = doc["results"]
    assert doc["command"].startswith("python -m bench idle")
    roles = set(result["per_process_pct"])
    for stage in ("monitor", "router", "publisher", "store", "fanout"):
        assert f"node.workers.{stage}" in roles
    assert "node.workers.web/worker" in roles
    assert result["idle_cpu_pct_of_one_core"] >= 0
    for what in ("ack", "client app", "store"):
        lat = result["wake_latency_ms"][what]
        assert 0 < lat["median"] <= lat["max"] < 10_000
