"""Metrics of a whole running node (contract 6): every process's ``/metrics``
scraped and parsed while real traffic flows through web -> monitor -> router ->
publisher -> store and fanout."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import websockets
import yaml
from prometheus_client.parser import text_string_to_metric_families
from websockets.protocol import State

from node.auth import issue_client_token
from node.config import Settings
from tests.metrics.conftest import (
    PROCESSES,
    SECRET,
    Node,
    Samples,
    exported_names,
    label_values,
    send_messages,
    value,
)
from tests.support import REPO, wait_until

pytestmark = pytest.mark.timeout(120)


def stage_counts(node: Node) -> dict[str, float]:
    s = node.scrape_all()
    return {
        "received": value(s["web"], "iotnode_messages_total", stage="received"),
        "acked": value(s["web"], "iotnode_messages_total", stage="acked"),
        "ack_latency_count": value(s["web"], "iotnode_ack_latency_seconds_count"),
        "batch_records": value(s["web"], "iotnode_persist_batch_records_sum"),
        "batches": value(s["web"], "iotnode_persist_batches_total"),
        "persist_durations": value(s["web"], "iotnode_persist_duration_seconds_count"),
        "persist_seconds": value(s["web"], "iotnode_persist_seconds_total"),
        "persist_duration_sum": value(s["web"], "iotnode_persist_duration_seconds_sum"),
        "bad_seq": value(s["web"], "iotnode_errors_total", stage="web", reason="bad_seq"),
        "auth_401": value(s["web"], "iotnode_errors_total", stage="web", reason="auth_401"),
        "oversize": value(s["web"], "iotnode_errors_total", stage="web", reason="oversize"),
        "forwarded": value(s["monitor"], "iotnode_messages_total", stage="forwarded"),
        "routed": value(s["router"], "iotnode_messages_total", stage="routed"),
        "published": value(s["publisher"], "iotnode_messages_total", stage="published"),
        "stored": value(s["store"], "iotnode_messages_total", stage="stored"),
        "streamed": value(s["fanout"], "iotnode_messages_total", stage="streamed"),
        "store_commits": value(s["store"], "iotnode_store_commit_seconds_count"),
        "ingress_depth": value(s["monitor"], "iotnode_ring_depth", ring="ingress"),
        "fanin_depth": value(s["publisher"], "iotnode_ring_depth", ring="fanin"),
    }


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def settled_counts(node: Node) -> dict[str, float]:
    """Stage counts once the rings are empty and nothing moved for longer than the web
    workers' flush interval (so a count taken now is not still on its way)."""
    previous = stage_counts(node)
    for _ in range(30):
        time.sleep(1.2)
        current = stage_counts(node)
        if current == previous and current["ingress_depth"] == 0 and current["fanin_depth"] == 0:
            return current
        previous = current
    raise AssertionError(f"the node's counts did not settle: {previous}")


async def follow_live(node: Node, client: Any, device: str, tries: int = 100) -> int:
    """Send ``device``'s messages one at a time (seq 0, 1, ...) until the client app
    streams one: its subscription has reached the publisher.  Reads every frame up to
    the last seq sent and returns the next seq."""
    async with node.connect(device) as ws:
        for seq in range(tries):
            await ws.send(f'{{"seq": {seq}, "data": {{"warm-up": {seq}}}}}')
            assert json.loads(await asyncio.wait_for(ws.recv(), 20)) == {"ack": seq}
            try:
                frame = json.loads(await asyncio.wait_for(client.recv(), 0.2))
            except TimeoutError:
                continue
            while frame["seq"] < seq:
                frame = json.loads(await asyncio.wait_for(client.recv(), 20))
            assert frame["seq"] == seq, frame
            return seq + 1
    raise AssertionError(f"the client app streamed none of {tries} messages of {device}")


def test_counters_add_up_from_receipt_through_every_stage_once_drained(node: Node) -> None:
    devices, per_device = [f"count-{i}" for i in range(4)], 150
    total = len(devices) * per_device
    followed = devices[0]
    streamed: list[dict[str, object]] = []
    first: list[int] = []  # the first seq sent once the client app's subscription is live
    before: dict[str, float] = {}

    async def go() -> None:
        token = issue_client_token(SECRET, [followed])
        url = f"ws://127.0.0.1:{node.port('fanout')}/v1/stream?device={followed}"
        async with websockets.connect(
            url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=20, ping_interval=None
        ) as client:
            first.append(await follow_live(node, client, followed))
            before.update(await asyncio.to_thread(settled_counts, node))  # the warm-up is not counted
            await asyncio.to_thread(send_messages, node, devices, per_device, first[0])
            async with node.connect("count-bad") as ws:
                await ws.send('{"seq": -1, "data": 1}')
                assert "error" in json.loads(await asyncio.wait_for(ws.recv(), 20))
            async with node.connect("count-big") as ws:
                await ws.send(b"x" * (int(node.env.get("NODE_MAX_MESSAGE_BYTES", 65536)) + 1))
                with pytest.raises(websockets.ConnectionClosedError) as closed:
                    await asyncio.wait_for(ws.recv(), 20)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
            with pytest.raises(websockets.InvalidStatus):
                async with websockets.connect(node.ingest_url + "?token=not-a-jwt", open_timeout=20):
                    pass
            while len(streamed) < per_device:
                streamed.append(json.loads(await asyncio.wait_for(client.recv(), 20)))

    asyncio.run(asyncio.wait_for(go(), 120))
    assert [m["seq"] for m in streamed] == list(range(first[0], first[0] + per_device))

    counts: dict[str, float] = {}

    def drained() -> bool:
        counts.update(delta(stage_counts(node), before))
        return (
            counts["stored"] >= total
            and counts["acked"] >= total
            and counts["streamed"] >= per_device
            and counts["auth_401"] >= 1
            and counts["oversize"] >= 1
            and counts["bad_seq"] >= 1
            and counts["ingress_depth"] == 0
            and counts["fanin_depth"] == 0
            and counts["ack_latency_count"] >= total
        )

    wait_until(drained, 30, interval=0.2, what="the node to drain")
    for stage in (
        "received",
        "acked",
        "ack_latency_count",
        "batch_records",
        "forwarded",
        "routed",
        "published",
        "stored",
    ):
        assert counts[stage] == total, (stage, counts)
    assert counts["streamed"] == per_device, counts
    assert counts["bad_seq"] == 1 and counts["auth_401"] == 1 and counts["oversize"] == 1, counts
    assert 1 <= counts["batches"] <= total and counts["store_commits"] >= 1, counts
    assert counts["persist_durations"] == counts["batches"], counts  # one persist time per group commit
    store = node.scrape("store")
    assert 0 <= value(store, "iotnode_store_lag_seconds") < 60  # newest stored vs its received_at
    web = node.wait_metric(  # every worker's gauges are at most a flush interval old
        "web",
        lambda s: value(s, "iotnode_web_pending_bytes") == 0 and value(s, "iotnode_device_connections") == 0,
    )
    assert value(web, "iotnode_persist_bytes_total") > total * 20  # every record's bytes, ~30+ each
    assert counts["persist_duration_sum"] == pytest.approx(counts["persist_seconds"], rel=1e-6, abs=1e-9)


def test_ring_gauges_rise_while_a_stage_is_stopped_and_return_to_zero(node: Node) -> None:
    stored_before = value(node.scrape("store"), "iotnode_messages_total", stage="stored")
    monitor = node.scrape("monitor")
    assert value(monitor, "iotnode_ring_capacity_bytes", ring="ingress") == int(
        node.env["NODE_INGRESS_RING_BYTES"]
    )
    assert label_values(monitor, "iotnode_ring_backend_info", "backend", ring="ingress") <= {
        "pmem",
        "msync",
        "mmap",
    }
    assert value(monitor, "iotnode_ring_backend_info", ring="ingress") == 1
    publisher = node.scrape("publisher")
    assert value(publisher, "iotnode_ring_capacity_bytes", ring="fanin") == int(
        node.env["NODE_FANIN_RING_BYTES"]
    )
    total = 2 * 60
    node.signal("router", signal.SIGSTOP)
    try:
        send_messages(node, ["depth-0", "depth-1"], 60)  # acked: they are in the ingress ring
        s = node.wait_metric(
            "monitor",
            lambda s: value(s, "iotnode_ring_depth", ring="ingress") >= total,
            what="ingress depth while the router is stopped",
        )
        assert value(s, "iotnode_ring_used_bytes", ring="ingress") > 0
        node.signal("store", signal.SIGSTOP)
        node.signal("router", signal.SIGCONT)
        node.wait_metric(
            "monitor",
            lambda s: value(s, "iotnode_ring_depth", ring="ingress") == 0,
            what="ingress ring drained into the fan-in ring",
        )
        s = node.wait_metric(
            "publisher",
            lambda s: value(s, "iotnode_ring_depth", ring="fanin") >= total,
            what="fan-in depth while the store is stopped",
        )
        assert value(s, "iotnode_ring_used_bytes", ring="fanin") > 0
    finally:
        node.signal("router", signal.SIGCONT)
        node.signal("store", signal.SIGCONT)
    node.wait_metric(
        "publisher",
        lambda s: value(s, "iotnode_ring_depth", ring="fanin") == 0,
        what="fan-in ring drained once the store runs",
    )
    node.wait_metric(
        "store",
        lambda s: value(s, "iotnode_messages_total", stage="stored") == stored_before + total,
        what="the store to count every record once",
    )


def test_every_process_exposes_its_cpu_and_rss_web_workers_included(node: Node) -> None:
    scrapes = node.scrape_all()
    for name in PROCESSES:
        s = scrapes[name]
        pids = label_values(s, "iotnode_process_cpu_seconds_total", "pid", process=name)
        assert pids, f"{name}: no iotnode_process_cpu_seconds_total"
        assert label_values(s, "iotnode_process_resident_memory_bytes", "pid", process=name) == pids
        for pid in pids:
            assert value(s, "iotnode_process_cpu_seconds_total", process=name, pid=pid) > 0
            assert value(s, "iotnode_process_resident_memory_bytes", process=name, pid=pid) > 10 << 20
        if name != "web":
            (pid,) = pids
            assert int(pid) in {node.processes.procs[name].pid}, (name, pid)
    web = scrapes["web"]
    assert {
        int(p) for p in label_values(web, "iotnode_process_cpu_seconds_total", "pid", process="web")
    } == set(node.web_workers())
    assert label_values(web, "iotnode_process_cpu_seconds_total", "pid", process="web-supervisor") == {
        str(node.processes.procs["web"].pid)
    }
    assert value(web, "iotnode_web_workers") == len(node.web_workers())


def _socket_count(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            pass
    return count


def test_sigkilled_web_worker_stops_counting_as_live_and_its_counts_stay(node: Node) -> None:
    opened = 8
    multiproc_dir = Path(node.env["NODE_DATA_DIR"]) / "metrics-web"

    async def go() -> None:
        conns = []
        try:
            for i in range(opened):
                ws = await node.connect(f"kill-{i}")
                conns.append(ws)
                await ws.send(f'{{"seq": {i}, "data": 0}}')
                assert "ack" in await asyncio.wait_for(ws.recv(), 20)
            s = await asyncio.to_thread(
                node.wait_metric, "web", lambda s: value(s, "iotnode_device_connections") == opened
            )
            acked_before = value(s, "iotnode_messages_total", stage="acked")
            workers = node.web_workers()
            victim = max(workers, key=_socket_count)  # the worker holding the most connections
            assert (multiproc_dir / f"gauge_livesum_{victim}.db").exists()
            os.kill(victim, signal.SIGKILL)

            def closed() -> int:
                return sum(ws.state is State.CLOSED for ws in conns)

            await asyncio.to_thread(
                wait_until, lambda: closed() >= 1, 20, 0.05, "the victim's connections to close"
            )

            def recovered(s: Samples) -> bool:
                pids = label_values(s, "iotnode_process_cpu_seconds_total", "pid", process="web")
                return (
                    str(victim) not in pids
                    and len(pids) == len(workers)
                    and value(s, "iotnode_web_workers") == len(workers)
                    and value(s, "iotnode_device_connections") == opened - closed()
                )

            s = await asyncio.to_thread(
                node.wait_metric,
                "web",
                recovered,
                30,
                "the killed worker's live gauges to be dropped and a new worker counted",
            )
            assert not (multiproc_dir / f"gauge_livesum_{victim}.db").exists()
            assert victim not in node.web_workers()
            assert value(s, "iotnode_messages_total", stage="acked") >= acked_before  # counters never go down
            assert closed() < opened or len(workers) == 1
        finally:
            for ws in conns:
                await ws.close()

    asyncio.run(asyncio.wait_for(go(), 90))


def test_dashboard_queries_and_scrape_config_use_only_what_the_node_exports(node: Node) -> None:
    exported: set[str] = set()
    for name in PROCESSES:
        exported |= exported_names(node.scrape_text(name))
    dashboard = json.loads((REPO / "deploy" / "grafana" / "iotnode.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used: set[str] = set()
    for expr in exprs:
        names = set(re.findall(r"\biotnode_[a-z0-9_]+", expr))
        assert names, f"no iotnode metric in {expr!r}"
        assert names <= exported, f"{expr!r} uses {sorted(names - exported)}, not exported by any process"
        used |= names
    assert {
        "iotnode_messages_total",
        "iotnode_ring_depth",
        "iotnode_ack_latency_seconds_bucket",
        "iotnode_errors_total",
        "iotnode_device_connections",
        "iotnode_fanout_clients",
        "iotnode_process_cpu_seconds_total",
        "iotnode_process_resident_memory_bytes",
    } <= used
    assert any("histogram_quantile" in e and "iotnode_ack_latency_seconds_bucket" in e for e in exprs)

    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = {
        static["labels"]["component"]: static["targets"]
        for job in config["scrape_configs"]
        for static in job["static_configs"]
    }
    defaults = Settings()
    ports = {
        "web": defaults.web_port,
        "fanout": defaults.fanout_port,
        "monitor": defaults.metrics_port_monitor,
        "router": defaults.metrics_port_router,
        "publisher": defaults.metrics_port_publisher,
        "store": defaults.metrics_port_store,
        # the optional storage sinks (Procfile.storage)
        "postgres": defaults.metrics_port_postgres,
        "victoria": defaults.metrics_port_victoria,
        "lake": defaults.metrics_port_lake,
    }
    assert targets == {name: [f"127.0.0.1:{port}"] for name, port in ports.items()}


# Which process exports which iotnode_ family (without the _total/_bucket suffixes).
SHARED = {
    "iotnode_messages",
    "iotnode_errors",
    "iotnode_process_cpu_seconds",
    "iotnode_process_resident_memory_bytes",
}
RING = {
    "iotnode_ring_depth",
    "iotnode_ring_used_bytes",
    "iotnode_ring_capacity_bytes",
    "iotnode_ring_fill_ratio",
    "iotnode_ring_headroom_seconds",
    "iotnode_ring_backend_info",
}
OWNED = {
    "web": {
        "iotnode_ack_latency_seconds",
        "iotnode_persist_batches",
        "iotnode_persist_seconds",
        "iotnode_persist_bytes",
        "iotnode_persist_batch_records",
        "iotnode_persist_duration_seconds",
        "iotnode_ring_full",
        "iotnode_backpressure_pauses",
        "iotnode_backpressure_paused_seconds",
        "iotnode_device_connections",
        "iotnode_web_pending_bytes",
        "iotnode_web_workers",
    },
    "monitor": RING,
    "router": set(),
    "publisher": RING,
    "store": {"iotnode_store_commit_seconds", "iotnode_store_lag_seconds", "iotnode_store_gaps"},
    "fanout": {"iotnode_fanout_clients", "iotnode_fanout_slow_client_drops", "iotnode_fanout_duplicates"},
}


def test_each_process_exports_only_its_own_metrics_and_web_gauges_carry_no_pid(node: Node) -> None:
    send_messages(node, ["own-1"], 3)  # the web's labelled counters have values to merge
    exporters: dict[str, set[str]] = {}
    for name in PROCESSES:
        text = node.scrape_text(name)
        families = {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("iotnode_")}
        for created in [
            n for n in families if n.endswith("_created") and n.removesuffix("_created") in families
        ]:
            del families[
                created
            ]  # a single process's counters and histograms also say when they were created
        for family in families.values():
            exporters.setdefault(family.name, set()).add(name)
            for s in family.samples:
                if not family.name.startswith("iotnode_process_"):
                    assert "pid" not in s.labels, f"{name}: {s.name}{s.labels} is per pid"
        assert OWNED[name] <= set(families), f"{name}: missing {sorted(OWNED[name] - set(families))}"
        if name == "web":  # exactly its own (errors: absent until the web counts one)
            assert set(families) - {"iotnode_errors"} == (OWNED["web"] | SHARED) - {"iotnode_errors"}, (
                f"web: extra {sorted(set(families) - OWNED['web'] - SHARED)}"
            )
    for family, where in exporters.items():
        if family in RING:
            assert where == {"monitor", "publisher"}, (family, where)
        elif family not in SHARED:
            assert len(where) == 1, f"{family} is exported by {sorted(where)}: only its owner should"
    web = node.scrape("web")
    assert value(web, "iotnode_web_workers") == int(node.env["NODE_WEB_WORKERS"])
    assert value(web, "iotnode_messages_total", stage="acked") >= 3
    monitor, publisher = node.scrape("monitor"), node.scrape("publisher")
    assert label_values(monitor, "iotnode_ring_capacity_bytes", "ring") == {"ingress"}
    assert label_values(publisher, "iotnode_ring_capacity_bytes", "ring") == {"fanin"}
    assert value(monitor, "iotnode_ring_capacity_bytes", ring="ingress") == int(
        node.env["NODE_INGRESS_RING_BYTES"]
    )
