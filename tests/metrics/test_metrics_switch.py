"""``NODE_METRICS=off``: the web front skips its per-group metric work (the switch
the overhead measurement uses) but still answers ``/metrics`` with CPU and RSS."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.metrics.conftest import label_values, send_messages, start_node, value
from tests.support import REPO, Processes, node_env

pytestmark = pytest.mark.timeout(60)


def test_metrics_off_web_counts_nothing_per_group_but_reports_cpu_and_rss(
    data_dir: Path, tmp_path: Path, processes: Processes
) -> None:
    node = start_node(data_dir, tmp_path, processes, names=("web",), NODE_METRICS="off")
    try:
        send_messages(node, ["off-0", "off-1"], 20)  # acked: persisted in the ingress ring
        time.sleep(1.5)  # longer than the flush interval of metrics "on"
        s = node.scrape("web")
        assert value(s, "iotnode_messages_total", stage="acked") == 0
        assert value(s, "iotnode_ack_latency_seconds_count") == 0
        assert value(s, "iotnode_persist_batches_total") == 0
        workers = {str(pid) for pid in node.web_workers()}
        assert label_values(s, "iotnode_process_cpu_seconds_total", "pid", process="web") == workers
        assert label_values(s, "iotnode_process_resident_memory_bytes", "pid", process="web") == workers
    finally:
        node.client.close()


def test_bad_metrics_switch_value_exits_2_naming_the_variable(tmp_path: Path) -> None:
    env = node_env(tmp_path / "data", NODE_METRICS="sometimes")
    result = subprocess.run([sys.executable, "-m", "node.workers.web"], env=env, cwd=str(REPO),
                            capture_output=True, timeout=30)
    assert result.returncode == 2
    assert b"NODE_METRICS='sometimes'" in result.stderr and b"expected one of on, off" in result.stderr
