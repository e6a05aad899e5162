"""deploy/grafana/telemetry.json: every panel's query returns data from a real node.

A real node runs with the VictoriaMetrics sink and a device registry; the test's
VictoriaMetrics both receives the telemetry (the sink's ``/write``) and scrapes the
node's ``/metrics`` every second (``-promscrape.config``), so it also answers the
"Prometheus" panels (VictoriaMetrics speaks the Prometheus query API).  Devices send
for a few seconds; then every template variable query and every panel query, with
the variables substituted as Grafana would, must return data.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.metrics.conftest import PORT_VAR, start_node
from tests.storage.conftest import VmServer
from tests.storage.test_node_storage import send_round
from tests.support import REPO, Processes, free_port, wait_until

DASHBOARD = REPO / "deploy" / "grafana" / "telemetry.json"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "iotnode.yaml"


def test_dashboard_is_well_formed_and_its_data_sources_are_provisioned() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    sources = {d["uid"]: d for d in yaml.safe_load(PROVISIONING.read_text())["datasources"]}
    assert set(sources) == {"victoriametrics", "prometheus"}
    assert all(d["type"] == "prometheus" for d in sources.values())
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"region", "type", "class", "device"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    kinds = {p["type"] for p in dashboard["panels"]}
    assert {"timeseries", "table", "geomap"} <= kinds
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] in sources, panel["title"]


def substitute(expr: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        return values[match.group(1)]

    return re.sub(r"\$(\w+)", one, expr)


def label_values(vm: VmServer, query: str) -> list[str]:
    """Grafana's ``label_values(selector, label)`` through the Prometheus API, as the data source does."""
    match = re.fullmatch(r"label_values\((.*), (\w+)\)", query)
    assert match, query
    selector, label = match.groups()
    now = time.time()
    answer = vm.get_json(
        f"/api/v1/label/{label}/values", **{"match[]": selector, "start": str(now - 3600), "end": str(now)}
    )
    assert answer["status"] == "success", answer
    return list(answer["data"])


@pytest.mark.slow
def test_every_panel_query_returns_data_from_a_real_node(
    vm: VmServer, tmp_path: Path, processes: Processes
) -> None:
    prefix = f"g{int(time.time() * 1000) % 10**8}-"
    devices = [f"{prefix}{i}" for i in range(6)]
    registry = tmp_path / "devices.csv"
    registry.write_text(
        "device_id,type,class,region,site,lat,lon\n"
        + "\n".join(
            f"{d},thermo,env,eu-west,s{i},{48.85 + i / 100},{2.35 + i / 100}" for i, d in enumerate(devices)
        )
        + "\n"
    )
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    victoria_port = free_port()
    node = start_node(
        data_dir,
        tmp_path,
        processes,
        NODE_VM_URL=vm.url,
        NODE_DEVICE_REGISTRY=registry,
        NODE_METRICS_PORT_VICTORIA=victoria_port,
    )
    try:
        processes.start("victoria", "node.workers.victoria", node.env, tmp_path)
        targets = [f"127.0.0.1:{node.env[var]}" for var in PORT_VAR.values()] + [f"127.0.0.1:{victoria_port}"]
        job = f"dash-{prefix}"
        vm.scrape_config.write_text(
            yaml.safe_dump(
                {
                    "scrape_configs": [
                        {"job_name": job, "scrape_interval": "1s", "static_configs": [{"targets": targets}]}
                    ]
                }
            )
        )
        vm.reload_scrape_config()
        base = time.time() - 30
        for round_ in range(3):  # a few seconds of traffic: rates need two scrapes in their window
            send_round(node, devices, round_ * 40, 40, base)

        def scraped() -> bool:
            vm.flush()
            got = vm.get_json("/api/v1/query", query=f'count(up{{job="{job}"}} == 1)')["data"]["result"]
            acked = vm.get_json("/api/v1/query", query='sum(iotnode_messages_total{stage="acked"})')
            return bool(got) and int(got[0]["value"][1]) == len(targets) and bool(acked["data"]["result"])

        wait_until(scraped, 30, 0.5, "VictoriaMetrics to scrape every node process")

        def acked_in_vm() -> float:
            vm.flush()
            got = vm.get_json("/api/v1/query", query='sum(iotnode_messages_total{stage="acked"})')
            return float(got["data"]["result"][0]["value"][1])

        # rate() needs the counters to *move* between two scrapes: the first scrape that saw
        # them may have come after all the traffic (the web workers publish their metrics
        # about a second late), which left every rate at 0 and the ack quantiles empty.  So
        # one more round once VictoriaMetrics scrapes, and wait until it saw that round.
        seen = acked_in_vm()
        send_round(node, devices, 3 * 40, 40, base)
        wait_until(lambda: acked_in_vm() > seen, 30, 0.5, "VictoriaMetrics to scrape the last round's acks")
        time.sleep(2.5)  # at least two scrapes after the traffic
        vm.flush()

        dashboard = json.loads(DASHBOARD.read_text())
        values = {"region": "eu-west", "type": "thermo", "class": "env", "device": f"{prefix}.*"}
        for var in dashboard["templating"]["list"]:
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found = label_values(vm, substitute(query, {**values, "field": ".+"}))
            assert found, f"variable {var['name']}: {query} returned nothing"
            if var["name"] == "field":
                pattern = var["regex"].strip("/")
                fields = sorted(f for f in found if re.match(pattern, f))
                assert "thermo_temp" in fields and "thermo_iotnode_seq" not in fields, fields
                values["field"] = "thermo_temp"
        assert set(values) == {v["name"] for v in dashboard["templating"]["list"]}

        checked = 0
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = substitute(target["expr"], values)
                result = run_query(vm, expr, instant=bool(target.get("instant")))
                print("PANEL", panel["title"], len(result), str(result[:1])[:200]) if result else None
                assert result, f"panel {panel['title']!r}: {expr} returned no data"
                if panel["type"] == "geomap":
                    assert all(r["metric"].get("geohash") for r in result), result
                checked += 1
        assert checked == sum(len(p.get("targets", [])) for p in dashboard["panels"]) >= 9
    finally:
        vm.scrape_config.write_text("scrape_configs: []\n")
        vm.reload_scrape_config()
        node.client.close()


def run_query(vm: VmServer, expr: str, instant: bool) -> list[dict[str, Any]]:
    now = time.time()
    if instant:
        answer = vm.get_json("/api/v1/query", query=expr, time=str(now))
    else:
        answer = vm.get_json("/api/v1/query_range", query=expr, start=str(now - 120), end=str(now), step="2s")
    assert answer["status"] == "success", (expr, answer)
    results: list[dict[str, Any]] = answer["data"]["result"]
    if instant:
        return results
    return [r for r in results if any(v[1] not in ("NaN", "0") for v in r["values"]) or r["values"]]
