"""The storage tier on a whole node: devices -> web -> ... -> store -> (postgres, victoria, lake).

A real node (the Procfile's six processes) runs with all three external sinks.
Devices send JSON messages over WebSocket in three rounds, each under a fault:

1. VictoriaMetrics is down: devices are acked as fast as without it, the SQLite
   store holds everything, the VictoriaMetrics sink's lag grows (no push-back).
2. The device registry changes (no restart); the lake sink is SIGKILLed and
   restarted; VictoriaMetrics starts and its sink catches up.
3. PostgreSQL crashes (immediate shutdown) and restarts; the PostgreSQL and
   VictoriaMetrics sinks are SIGKILLed and restarted.

At the end every acked message is in every sink exactly once, and rows received
after the registry change carry the new context.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import duckdb
import pytest

from tests.metrics.conftest import Node, start_node, value
from tests.storage.conftest import PgServer, VmServer
from tests.storage.test_sinks import assert_exactly_once, scrape
from tests.support import Processes, free_port, wait_until

DEVICES = 12
PER_ROUND = 150  # messages per device per round
SINKS = ("postgres", "victoria", "lake")


async def _device(node: Node, device: str, start: int, count: int, base: float) -> None:
    async with node.connect(device) as ws:
        for seq in range(start, start + count):
            msg = {"seq": seq, "ts": base + seq * 0.01, "data": {"v": seq, "temp": 20.5, "note": "n"}}
            await ws.send(json.dumps(msg))
            await asyncio.sleep(0.02)  # paced: a round lasts ~3 s, while the faults happen
        last = -1
        while last < start + count - 1:
            reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
            assert "ack" in reply, reply
            last = reply["ack"]


def send_round(node: Node, devices: list[str], start: int, count: int, base: float) -> float:
    """Every device sends ``count`` messages and waits for their acks; returns the seconds it took."""
    began = time.monotonic()

    async def run() -> None:
        await asyncio.wait_for(asyncio.gather(*(_device(node, d, start, count, base) for d in devices)), 90)

    asyncio.run(run())
    return time.monotonic() - began


def in_background(target, *args) -> tuple[threading.Thread, list[object]]:  # type: ignore[no-untyped-def]
    out: list[object] = []

    def run() -> None:
        try:
            out.append(target(*args))
        except BaseException as exc:  # the test re-raises it
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@pytest.mark.slow
def test_whole_node_feeds_every_sink_once_through_faults_and_a_registry_change(
    pg: PgServer, vm: VmServer, tmp_path: Path, processes: Processes
) -> None:
    prefix = f"n{int(time.time() * 1000) % 10**8}-"
    devices = [f"{prefix}{i}" for i in range(DEVICES)]
    registry = tmp_path / "devices.csv"
    rows = [f"{d},thermo,env,eu-west,site-{i},48.85,2.35," for i, d in enumerate(devices[:6])]
    registry.write_text("device_id,type,class,region,site,lat,lon,labels\n" + "\n".join(rows) + "\n")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    lake = tmp_path / "lake"
    ports = {s: free_port() for s in SINKS}
    node = start_node(
        data_dir,
        tmp_path,
        processes,
        NODE_PG_DSN=pg.dsn,
        NODE_VM_URL=vm.url,
        NODE_LAKE_DIR=lake,
        NODE_LAKE_FLUSH_ROWS=2000,
        NODE_LAKE_FLUSH_SECONDS=0.5,
        NODE_SINK_BATCH_ROWS=1000,
        NODE_DEVICE_REGISTRY=registry,
        NODE_METRICS_PORT_POSTGRES=ports["postgres"],
        NODE_METRICS_PORT_VICTORIA=ports["victoria"],
        NODE_METRICS_PORT_LAKE=ports["lake"],
    )

    try:
        check_node(node, pg, vm, tmp_path, processes, prefix, devices, rows, registry, data_dir, lake, ports)
    finally:
        node.client.close()


def check_node(  # type: ignore[no-untyped-def]
    node: Node, pg, vm, tmp_path, processes, prefix, devices, rows, registry, data_dir, lake, ports
) -> None:
    def start_sink(name: str) -> None:
        processes.start(name, f"node.workers.{name}", node.env, tmp_path)

    base = time.time() - 600
    vm.stop()  # ---- round 1: VictoriaMetrics is down
    try:
        for name in SINKS:
            start_sink(name)
        took = send_round(node, devices, 0, PER_ROUND, base)
        store_rows = lambda: node_store_count(data_dir, prefix)  # noqa: E731
        wait_until(lambda: store_rows() == DEVICES * PER_ROUND, 20, 0.2, "round 1 in the SQLite store")
        vm_metrics = wait_until(
            lambda: (m := scrape(ports["victoria"])).get("iotnode_sink_lag_records", 0) > 0 and m,
            10,
            0.2,
            "the VictoriaMetrics sink's lag to show the backlog",
        )
        assert isinstance(vm_metrics, dict)
        assert vm_metrics.get("iotnode_errors_total,reason=connection,stage=victoria", 0) > 0
        # The publisher does not wait for the sinks: the fan-in ring drains with VictoriaMetrics down.
        node.wait_metric(
            "publisher",
            lambda m: value(m, "iotnode_ring_depth", ring="fanin") == 0,
            10,
            "fan-in ring drained",
        )
        assert took < 30, f"devices took {took:.1f} s with VictoriaMetrics down"
    finally:
        if vm.proc is None:
            vm.start()  # ---- round 2 (VictoriaMetrics back)
    changed_at = time.time()
    registry.write_text(
        "device_id,type,class,region,site,lat,lon,labels\n"
        + "\n".join(r.replace("eu-west", "us-east") for r in rows)
        + "\n"
    )
    thread, result = in_background(send_round, node, devices, PER_ROUND, PER_ROUND, base)
    time.sleep(0.8)
    processes.kill("lake", signal.SIGKILL)
    start_sink("lake")
    thread.join(120)
    assert result and not isinstance(result[0], BaseException), result
    # ---- round 3: PostgreSQL crashes; the postgres and victoria sinks are SIGKILLed
    thread, result = in_background(send_round, node, devices, 2 * PER_ROUND, PER_ROUND, base)
    time.sleep(0.5)
    pg.stop(signal.SIGQUIT)
    processes.kill("postgres", signal.SIGKILL)
    start_sink("postgres")
    time.sleep(0.7)
    pg.start()
    processes.kill("victoria", signal.SIGKILL)
    start_sink("victoria")
    thread.join(120)
    assert result and not isinstance(result[0], BaseException), result

    expected = {(d, s) for d in devices for s in range(3 * PER_ROUND)}
    wait_until(lambda: node_store_count(data_dir, prefix) == len(expected), 30, 0.2, "everything in SQLite")
    readers = {
        "postgres": lambda: [
            (d, int(s))
            for d, s in pg.query(
                "SELECT device_id, seq FROM iotnode_messages WHERE device_id LIKE %s", (prefix + "%",)
            )
        ],
        "victoria": lambda: vm_rows(vm, prefix),
        "lake": lambda: lake_rows(lake, prefix),
    }
    for name, read in readers.items():
        got: list[tuple[str, int]] = []

        def complete(read=read, got=got) -> bool:  # type: ignore[no-untyped-def]
            got[:] = read()
            return len(set(got)) >= len(expected)

        try:
            wait_until(complete, 45, 0.5, f"every message in {name}")
        except AssertionError:
            raise AssertionError(
                f"{name}: {len(set(got))} of {len(expected)}\n{processes.log(name)[-3000:]}"
            ) from None
        try:
            assert_exactly_once(got, expected)
        except AssertionError as exc:
            cursors = vm.export('{__name__="iotnode_sink_cursor_position"}')
            raise AssertionError(f"{name}: {exc}\n{processes.log(name)[-3000:]}\n{cursors}") from None
        lag = wait_until(lambda name=name: scrape(ports[name]).get("iotnode_sink_lag_records") == 0, 15, 0.2)
        assert lag

    # The registry change took effect without a restart of the postgres sink (killed only in round 3):
    regions = dict(
        pg.query(
            "SELECT received_at > to_timestamp(%s), array_agg(DISTINCT region) FROM iotnode_messages"
            " WHERE device_id = %s AND (received_at < to_timestamp(%s) OR received_at > to_timestamp(%s))"
            " GROUP BY 1",
            (changed_at, devices[0], changed_at - 0.5, changed_at + 2.5),
        )
    )
    assert regions == {False: ["eu-west"], True: ["us-east"]}, regions
    unknown = pg.query(
        "SELECT count(*) FROM iotnode_messages WHERE device_id = %s AND type = 'unknown'", (devices[-1],)
    )
    assert unknown == [(3 * PER_ROUND,)]  # not in the registry: stored, typed unknown


def node_store_count(data_dir: Path, prefix: str) -> int:
    import sqlite3

    db = sqlite3.connect(f"file:{data_dir / 'store.sqlite3'}?mode=ro", uri=True)
    try:
        return int(
            db.execute("SELECT count(*) FROM messages WHERE device_id LIKE ?", (prefix + "%",)).fetchone()[0]
        )
    except sqlite3.Error:
        return 0
    finally:
        db.close()


def vm_rows(vm: VmServer, prefix: str) -> list[tuple[str, int]]:
    vm.flush()
    out = []
    for series in vm.export(f'{{__name__=~".+_iotnode_seq", device_id=~"{prefix}.*"}}'):
        out.extend((series["metric"]["device_id"], int(v)) for v in series["values"])
    return out


def lake_rows(lake: Path, prefix: str) -> list[tuple[str, int]]:
    if not list(lake.glob("date=*/type=*/*.parquet")):
        return []
    return [
        (d, int(s))
        for d, s in duckdb.sql(
            f"SELECT device_id, seq FROM read_parquet('{lake}/*/*/*.parquet', hive_partitioning = true)"
            f" WHERE device_id LIKE '{prefix}%'"
        ).fetchall()
    ]
