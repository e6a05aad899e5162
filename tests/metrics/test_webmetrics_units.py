"""The web front's metric plumbing without a server: local buckets flushed into a
histogram equal per-message observations; counters export deltas once; dead pids'
live gauge files are removed; a zombie does not count as running."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from node.front.committer import FrontStats
from node.front.metrics import FrontMetrics, live_worker_pids
from node.metrics import LATENCY_BUCKETS
from node.procmetrics import ProcessStatsCollector, is_running, read_process
from tests.support import wait_until


def _buckets(registry: CollectorRegistry, name: str) -> dict[str, float]:
    out = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name.startswith(name):
                out[s.name + s.labels.get("le", "")] = s.value
    return out


def test_group_buckets_flushed_once_equal_observing_every_message() -> None:
    rng = random.Random(5)
    per_message, batched = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("lat_seconds", "x", buckets=LATENCY_BUCKETS, registry=per_message)
    h2 = Histogram("lat_seconds", "x", buckets=LATENCY_BUCKETS, registry=batched)
    metrics = FrontMetrics(FrontStats())
    for _ in range(50):
        now = 1000.0
        # exact bucket bounds included: "le" means <=
        delays = [rng.choice(LATENCY_BUCKETS) if rng.random() < 0.2 else rng.uniform(0, 6) for _ in range(40)]
        metrics.on_group(now, [now - d for d in delays], 100)
        for d in delays:
            h1.observe(now - (now - d))
    metrics.latency.flush(h2)
    a, b = _buckets(per_message, "lat_seconds"), _buckets(batched, "lat_seconds")
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key]), key
    assert b["lat_seconds_count"] == 2000
    assert metrics.latency.counts == [0] * (len(LATENCY_BUCKETS) + 1) and metrics.latency.sum == 0


def test_each_group_gets_its_own_persist_time_from_the_committers_running_total() -> None:
    stats = FrontStats()
    metrics = FrontMetrics(stats)
    for took in (0.0002, 0.003, 0.04):  # the committer adds the group's time, then calls on_group
        stats.append_seconds += took
        metrics.on_group(10.0, [9.9], 50)
    registry = CollectorRegistry()
    h = Histogram("persist_seconds", "x", buckets=LATENCY_BUCKETS, registry=registry)
    metrics.persist.flush(h)
    b = _buckets(registry, "persist_seconds")
    assert b["persist_seconds_count"] == 3 and b["persist_seconds_sum"] == pytest.approx(0.0432)
    assert b["persist_seconds_bucket0.00025"] == 1 and b["persist_seconds_bucket0.005"] == 2
    assert b["persist_seconds_bucket0.05"] == 3


def test_flush_exports_each_count_once_as_deltas() -> None:
    def get(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    stats = FrontStats()
    metrics = FrontMetrics(stats)
    before = (
        get("iotnode_messages_total", stage="received"),
        get("iotnode_messages_total", stage="acked"),
        get("iotnode_errors_total", stage="web", reason="bad_seq"),
        get("iotnode_errors_total", stage="web", reason="auth_403"),
    )
    stats.received, stats.acked, stats.open_connections = 7, 5, 3
    stats.errors = Counter({"bad_seq": 2})
    stats.refused = Counter({403: 1})
    metrics.flush()
    metrics.flush()  # nothing new: nothing added
    stats.received, stats.acked = 9, 9
    metrics.flush()
    after = (
        get("iotnode_messages_total", stage="received"),
        get("iotnode_messages_total", stage="acked"),
        get("iotnode_errors_total", stage="web", reason="bad_seq"),
        get("iotnode_errors_total", stage="web", reason="auth_403"),
    )
    assert [x - y for x, y in zip(after, before, strict=True)] == [9, 9, 2, 1]
    assert get("iotnode_device_connections") == 3


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_zombie_or_gone_pid_is_not_running_and_has_no_process_sample() -> None:
    zombie = subprocess.Popen(["true"])
    try:
        wait_until(lambda: not is_running(zombie.pid), 10, what="the child to exit (left unreaped)")
        assert Path(f"/proc/{zombie.pid}").exists()  # still a zombie: its parent has not reaped it
    finally:
        zombie.wait()
    gone = _dead_pid()
    assert not is_running(gone) and read_process(gone) is None
    assert is_running(os.getpid())
    families = list(ProcessStatsCollector(lambda: [("me", os.getpid()), ("gone", gone)]).collect())
    assert [(s.name, s.labels["process"]) for f in families for s in f.samples] == [
        ("iotnode_process_cpu_seconds_total", "me"),
        ("iotnode_process_resident_memory_bytes", "me"),
    ]


def test_live_worker_pids_marks_dead_pids_and_keeps_live_ones(tmp_path: Path) -> None:
    dead = _dead_pid()
    for pid in (os.getpid(), dead):
        (tmp_path / f"gauge_livesum_{pid}.db").write_bytes(b"")
    (tmp_path / f"counter_{dead}.db").write_bytes(b"")  # counters of a dead worker are kept
    assert live_worker_pids(str(tmp_path)) == [os.getpid()]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"gauge_livesum_{os.getpid()}.db", f"counter_{dead}.db"]
    )
    assert live_worker_pids(str(tmp_path)) == [os.getpid()]  # idempotent


_EVERY_GAUGE_SET_IN_MULTIPROCESS_MODE = r"""
import sys
from prometheus_client import CollectorRegistry, Gauge, generate_latest, multiprocess
import node.metrics as m

for name in m.__annotations__:
    metric = getattr(m, name)
    if isinstance(metric, Gauge):
        labels = {label: "x" for label in metric._labelnames}
        (metric.labels(**labels) if labels else metric).set(3)
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry, sys.argv[1])
sys.stdout.write(generate_latest(registry).decode())
"""


def test_every_gauge_merges_across_processes_without_a_pid_label(tmp_path: Path) -> None:
    """In multiprocess mode a gauge left at the default mode ("all") is reported once
    per pid; every gauge of node.metrics names a mode that merges (livesum, max, ...)."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    text = subprocess.run(
        [sys.executable, "-c", _EVERY_GAUGE_SET_IN_MULTIPROCESS_MODE, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    gauges = {f.name: f.samples for f in text_string_to_metric_families(text) if f.type == "gauge"}
    assert {
        "iotnode_ring_depth",
        "iotnode_store_lag_seconds",
        "iotnode_fanout_clients",
        "iotnode_device_connections",
        "iotnode_web_workers",
    } <= set(gauges)
    for name, samples in gauges.items():
        assert samples and all("pid" not in s.labels and s.value == 3 for s in samples), (name, samples)
