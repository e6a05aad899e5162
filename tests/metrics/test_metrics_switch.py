"""``NODE_METRICS=off``: the web front skips its per-group metric work (the switch
the overhead measurement uses) but still answers ``/metrics`` with CPU and RSS."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.metrics.conftest import Node, label_values, send_messages, start_node, value
from tests.support import REPO, Processes, node_env, wait_for_port, wait_until

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
    result = subprocess.run(
        [sys.executable, "-m", "node.workers.web"], env=env, cwd=str(REPO), capture_output=True, timeout=30
    )
    assert result.returncode == 2
    assert b"NODE_METRICS='sometimes'" in result.stderr and b"expected one of on, off" in result.stderr


def test_web_started_without_multiproc_dir_still_sums_its_workers(
    data_dir: Path, tmp_path: Path, processes: Processes
) -> None:
    env = node_env(data_dir)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    stale = data_dir / "metrics-web"
    stale.mkdir()
    (stale / "counter_999999.db").write_bytes(b"stale")  # a previous run's file: wiped at start
    processes.start("web", "node.workers.web", env, tmp_path)
    node = Node(env, processes, tmp_path)
    try:
        wait_for_port(node.port("web"), timeout=30)
        wait_until(lambda: len(node.web_workers()) == 2, 20, what="2 web workers")
        devices = [f"nodir-{i}" for i in range(6)]
        send_messages(node, devices, 10)
        # (a worker counts itself once its app is built: the pid may exist a moment before)
        s = node.wait_metric(
            "web",
            lambda s: (
                value(s, "iotnode_messages_total", stage="acked") >= 60
                and value(s, "iotnode_web_workers") == 2
            ),
        )
        assert value(s, "iotnode_messages_total", stage="acked") == 60
        assert value(s, "iotnode_ack_latency_seconds_count") == 60
        assert value(s, "iotnode_web_workers") == 2
        assert not (stale / "counter_999999.db").exists()
        assert {p.name.rsplit("_", 1)[1] for p in stale.glob("gauge_livesum_*.db")} == {
            f"{pid}.db" for pid in node.web_workers()
        }
    finally:
        node.client.close()
