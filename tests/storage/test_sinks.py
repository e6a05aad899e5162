"""Each storage sink as a real process against a real destination, fed by a real SQLite store.

The store is written the way the ``store`` process writes it (``SqliteSink``); the
sink runs as ``python -m node.workers.<sink>``.  The crash test SIGKILLs the sink
repeatedly while it catches up on a backlog (so the kills land inside its writes)
and stops the destination under load (PostgreSQL: immediate shutdown, i.e. a
crash with WAL recovery; VictoriaMetrics: SIGTERM then restart); afterwards every
stored row is in the destination exactly once.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from tests.storage.conftest import Feeder, PgServer, StoreFiller, VmServer
from tests.support import REPO, Processes, free_port, node_env, wait_until

SINKS = ("postgres", "victoria", "lake")
# rows of backlog per kill round of the crash test: enough that the sink is still catching up
# when it is killed (the lake, reading columns in C into Arrow, drains 60k rows in well under 0.1 s)
BURST = {"postgres": 20000, "victoria": 20000, "lake": 200000}
TYPE_REGION_QUERY = (
    "EXPLAIN SELECT count(*) FROM iotnode_messages WHERE type = 'thermo' AND region = 'eu-west'"
    " AND received_at > now() - interval '1 hour'"
)


@dataclass
class Destination:
    kind: str
    env: dict[str, str]
    rows: Callable[[], list[tuple[str, int]]]  # (device_id, seq) of every stored row, duplicates kept
    restart: Callable[[], None]  # stop the destination under load and start it again
    prefix: str

    def metrics_port(self) -> int:
        return int(self.env[f"NODE_METRICS_PORT_{self.kind.upper()}"])


def _env(data_dir: Path, kind: str, **extra: object) -> dict[str, str]:
    env = node_env(
        data_dir,
        NODE_METRICS_PORT_POSTGRES=free_port(),
        NODE_METRICS_PORT_VICTORIA=free_port(),
        NODE_METRICS_PORT_LAKE=free_port(),
        NODE_SINK_BATCH_ROWS=500,
        NODE_LOG_LEVEL="info",
        **extra,
    )
    return env


def destination(
    kind: str, data_dir: Path, prefix: str, pg: PgServer | None, vm: VmServer | None
) -> Destination:
    if kind == "postgres":
        assert pg is not None

        def pg_rows() -> list[tuple[str, int]]:
            import psycopg

            try:
                got = pg.query(
                    "SELECT device_id, seq FROM iotnode_messages WHERE device_id LIKE %s", (prefix + "%",)
                )
            except psycopg.errors.UndefinedTable:
                return []  # the sink has not created it yet
            return [(d, int(s)) for d, s in got]

        def pg_restart() -> None:
            pg.stop(signal.SIGQUIT)  # immediate shutdown: no checkpoint, WAL recovery at start
            time.sleep(1.0)
            pg.start()

        return Destination(kind, _env(data_dir, kind, NODE_PG_DSN=pg.dsn), pg_rows, pg_restart, prefix)
    if kind == "victoria":
        assert vm is not None

        def vm_rows() -> list[tuple[str, int]]:
            vm.flush()
            out = []
            for series in vm.export(f'{{__name__=~".+_iotnode_seq", device_id=~"{prefix}.*"}}'):
                out.extend((series["metric"]["device_id"], int(v)) for v in series["values"])
            return out

        def vm_restart() -> None:
            vm.stop(signal.SIGTERM)
            time.sleep(1.0)
            vm.start()

        return Destination(kind, _env(data_dir, kind, NODE_VM_URL=vm.url), vm_rows, vm_restart, prefix)
    lake = data_dir.parent / "lake"

    def lake_rows() -> list[tuple[str, int]]:
        files = list(lake.glob("date=*/type=*/*.parquet"))
        if not files:
            return []
        got = duckdb.sql(
            f"SELECT device_id, seq FROM read_parquet('{lake}/*/*/*.parquet', hive_partitioning = true)"
        ).fetchall()
        return [(d, int(s)) for d, s in got]

    def lake_restart() -> None:  # the lake's "destination" is the file system: nothing to restart
        pass

    env = _env(data_dir, kind, NODE_LAKE_DIR=lake, NODE_LAKE_FLUSH_ROWS=1500, NODE_LAKE_FLUSH_SECONDS=0.3)
    return Destination(kind, env, lake_rows, lake_restart, prefix)


@pytest.fixture(params=SINKS)
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Destination]:
    kind = request.param
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    pg = request.getfixturevalue("pg") if kind == "postgres" else None
    vm = request.getfixturevalue("vm") if kind == "victoria" else None
    yield destination(kind, data_dir, f"{kind[:2]}{random.randrange(1 << 30):x}-", pg, vm)


def scrape(port: int) -> dict[str, float]:
    """A sink's metrics (labels but ``sink`` folded into the name); {} while it is (re)starting."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()) if k != "sink")
            out[key] = out.get(key, 0.0) + s.value
    return out


def wait_all(dest: Destination, expected: set[tuple[str, int]], timeout: float = 40) -> list[tuple[str, int]]:
    got: list[tuple[str, int]] = []

    def complete() -> bool:
        got[:] = dest.rows()
        return len(set(got)) >= len(expected)

    try:
        wait_until(complete, timeout, 0.5, f"{len(expected)} rows in {dest.kind}")
    except AssertionError:
        raise AssertionError(f"{dest.kind}: {len(set(got))} of {len(expected)} rows arrived") from None
    return got


def assert_exactly_once(got: list[tuple[str, int]], expected: set[tuple[str, int]]) -> None:
    twice = [key for key, n in Counter(got).items() if n > 1]
    assert not twice, f"stored more than once: {twice[:10]} ({len(twice)} rows)"
    assert set(got) == expected, (
        f"missing {sorted(expected - set(got))[:10]}, extra {sorted(set(got) - expected)[:10]}"
    )


def test_sink_stores_every_row_enriched_once_and_reports_lag_zero(
    dest: Destination, processes: Processes, tmp_path: Path
) -> None:
    data_dir = Path(dest.env["NODE_DATA_DIR"])
    registry = tmp_path / "devices.csv"
    registry.write_text(
        "device_id,type,class,region,site,lat,lon,labels\n"
        f"{dest.prefix}0,thermo,env,eu-west,paris-1,48.8566,2.3522,floor=3\n"
        f"{dest.prefix}1,meter,energy,us-east,nyc-3,40.7128,-74.0060,\n"
    )
    filler = StoreFiller(data_dir / "store.sqlite3", devices=3, prefix=dest.prefix)
    filler.write(3000)
    env = {**dest.env, "NODE_DEVICE_REGISTRY": str(registry)}
    processes.start(dest.kind, f"node.workers.{dest.kind}", env, tmp_path)
    got = wait_all(dest, set(filler.written))
    assert_exactly_once(got, set(filler.written))

    def caught_up() -> dict[str, float] | None:
        m = scrape(dest.metrics_port())
        return (
            m if m.get("iotnode_sink_rows_total") == 3000 and m.get("iotnode_sink_lag_records") == 0 else None
        )

    metrics = wait_until(caught_up, 15, 0.2, f"{dest.kind} metrics: 3000 rows, lag 0")
    assert isinstance(metrics, dict)
    assert metrics["iotnode_sink_lag_seconds"] == 0
    assert metrics["iotnode_sink_unknown_device_records_total"] == 1000  # the third device
    assert metrics["iotnode_sink_registry_devices"] == 2
    check_enrichment(dest, env)
    filler.close()


def check_enrichment(dest: Destination, env: dict[str, str]) -> None:
    p = dest.prefix
    if dest.kind == "postgres":
        import psycopg

        with psycopg.connect(env["NODE_PG_DSN"]) as conn:
            rows = conn.execute(
                "SELECT device_id, type, class, region, site, geohash, labels, data->>'v',"
                " pg_typeof(data)::text FROM iotnode_messages WHERE device_id LIKE %s AND seq = 7"
                " ORDER BY device_id",
                (p + "%",),
            ).fetchall()
            assert rows == [
                (f"{p}0", "thermo", "env", "eu-west", "paris-1", "u09tv", {"floor": "3"}, "7", "jsonb"),
                (f"{p}1", "meter", "energy", "us-east", "nyc-3", "dr5re", {}, "7", "jsonb"),
                (f"{p}2", "unknown", "", "", "", "", {}, "7", "jsonb"),
            ]
            partitioned = conn.execute(
                "SELECT count(*) FROM pg_partitioned_table WHERE partrelid = 'iotnode_messages'::regclass"
            ).fetchone()
            assert partitioned == (1,)
            index = conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'iotnode_messages_type_region_time'"
            ).fetchone()
            assert index is not None and "(type, region, received_at)" in index[0]
            conn.execute("SET enable_seqscan = off")  # a tiny table: make the planner show the index
            plan = "\n".join(r[0] for r in conn.execute(TYPE_REGION_QUERY).fetchall())
            assert "iotnode_messages_type_region" in plan or "type_region_received_at_idx" in plan, plan
    elif dest.kind == "victoria":
        series = VmServerExport(env["NODE_VM_URL"]).export(f'{{__name__=~"thermo_.+", device_id="{p}0"}}')
        names = {s["metric"]["__name__"] for s in series}
        assert names == {"thermo_v", "thermo_x", "thermo_iotnode_seq"}  # "s" (a string) is skipped
        labels = series[0]["metric"]
        assert {k: labels[k] for k in ("type", "class", "region", "geohash")} == {
            "type": "thermo",
            "class": "env",
            "region": "eu-west",
            "geohash": "u09tv",
        }
        unknown = VmServerExport(env["NODE_VM_URL"]).export(f'{{__name__="unknown_v", device_id="{p}2"}}')
        assert unknown and "region" not in unknown[0]["metric"]
        metrics = scrape(dest.metrics_port())
        assert metrics["iotnode_sink_skipped_fields_total"] == 3000  # one string per row
    else:
        lake = Path(env["NODE_LAKE_DIR"])
        assert not list(lake.rglob("*.tmp"))
        rows = duckdb.sql(
            "SELECT device_id, type, class, region, site, geohash, labels, data::JSON->>'v', date"
            f" FROM read_parquet('{lake}/*/*/*.parquet', hive_partitioning = true) WHERE seq = 7 ORDER BY 1"
        ).fetchall()
        assert [r[:8] for r in rows] == [
            (f"{p}0", "thermo", "env", "eu-west", "paris-1", "u09tv", '{"floor":"3"}', "7"),
            (f"{p}1", "meter", "energy", "us-east", "nyc-3", "dr5re", "{}", "7"),
            (f"{p}2", "unknown", "", "", "", "", "{}", "7"),
        ]
        assert {d.name for d in lake.glob("date=*/type=*")} == {"type=thermo", "type=meter", "type=unknown"}


class VmServerExport:
    def __init__(self, url: str) -> None:
        self.url = url

    def export(self, match: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/export", params={"match[]": match}, timeout=20)
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]


@pytest.mark.slow
def test_sigkill_mid_batch_and_destination_restart_under_load_store_each_row_once(
    dest: Destination, processes: Processes, tmp_path: Path
) -> None:
    data_dir = Path(dest.env["NODE_DATA_DIR"])
    filler = StoreFiller(data_dir / "store.sqlite3", devices=20, prefix=dest.prefix)
    feeder = Feeder(filler, total=12000, rate=2000)  # live traffic meanwhile
    feeder.start()
    mid_batch_kills = 0
    burst = BURST[dest.kind]
    for round_ in range(4):
        filler.write(burst)  # a backlog the sink is catching up on when it is killed
        processes.start(dest.kind, f"node.workers.{dest.kind}", dest.env, tmp_path)
        # Kill once it has written its first batches of the backlog: it is in the middle of
        # catching up (reading, enriching, writing batch after batch), so the kill lands in a write.
        metrics = wait_until(
            lambda: (m := scrape(dest.metrics_port())).get("iotnode_sink_rows_total", 0) >= 1000 and m,
            20,
            0.01,
            f"{dest.kind} to start writing",
        )
        processes.kill(dest.kind, signal.SIGKILL)  # at once: no second scrape in between
        assert isinstance(metrics, dict)
        mid_batch_kills += metrics["iotnode_sink_rows_total"] < burst
        if round_ == 1:
            dest.restart()  # the destination goes away under load; the next sink retries
    processes.start(dest.kind, f"node.workers.{dest.kind}", dest.env, tmp_path)
    time.sleep(0.5)
    dest.restart()  # and once more while the sink is running
    feeder.join(60)
    assert feeder.error is None and not feeder.is_alive()
    expected = set(filler.written)
    assert len(expected) == 4 * burst + 12000
    got = wait_all(dest, expected, timeout=60)
    assert_exactly_once(got, expected)
    assert mid_batch_kills == 4, f"only {mid_batch_kills} of 4 kills came before the backlog was written"
    log = processes.log(dest.kind)
    if dest.kind != "lake":
        assert "retrying" in log, log[-3000:]  # it saw its destination go away and came back
    filler.close()


def test_sink_without_its_variable_exits_2_naming_it(tmp_path: Path) -> None:
    for kind, variable in (
        ("postgres", "NODE_PG_DSN"),
        ("victoria", "NODE_VM_URL"),
        ("lake", "NODE_LAKE_DIR"),
    ):
        env = _env(tmp_path, kind)
        out = subprocess.run(
            [sys.executable, "-m", f"node.workers.{kind}"], env=env, cwd=REPO, capture_output=True, timeout=30
        )
        assert out.returncode == 2, out.stderr
        assert variable in out.stderr.decode()
    bad = subprocess.run(
        [sys.executable, "-m", "node.workers.victoria"],
        env={**_env(tmp_path, "victoria"), "NODE_VM_URL": "ftp://x"},
        cwd=REPO,
        capture_output=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "NODE_VM_URL='ftp://x'" in bad.stderr.decode()
    registry = tmp_path / "bad.csv"
    registry.write_text("device_id,lat,lon\na,1,x\n")
    bad = subprocess.run(
        [sys.executable, "-m", "node.workers.lake"],
        env={
            **_env(tmp_path, "lake"),
            "NODE_LAKE_DIR": str(tmp_path / "lake"),
            "NODE_DEVICE_REGISTRY": str(registry),
        },
        cwd=REPO,
        capture_output=True,
        timeout=30,
    )
    assert bad.returncode == 2, bad.stderr
    assert "NODE_DEVICE_REGISTRY" in bad.stderr.decode() and "bad.csv:2: lon" in bad.stderr.decode()


def test_a_row_the_destination_cannot_represent_is_skipped_and_counted_not_retried_forever(
    dest: Destination, processes: Processes, tmp_path: Path
) -> None:
    import sqlite3

    data_dir = Path(dest.env["NODE_DATA_DIR"])
    filler = StoreFiller(data_dir / "store.sqlite3", devices=2, prefix=dest.prefix)
    filler.write(100)
    db = sqlite3.connect(data_dir / "store.sqlite3")
    with db:  # what a device may legally send: JSON escapes jsonb refuses (lone surrogate, NUL)
        db.execute(
            "INSERT INTO messages VALUES (?, 0, NULL, ?, ?)",
            (f"{dest.prefix}odd", time.time(), '{"s":"\\ud800"}'),
        )
        db.execute(
            "INSERT INTO messages VALUES (?, 1, NULL, ?, ?)",
            (f"{dest.prefix}odd", time.time() + 0.01, '{"s":"a\\u0000b"}'),
        )
    db.close()
    filler.write(100)
    processes.start(dest.kind, f"node.workers.{dest.kind}", dest.env, tmp_path)
    expected = set(filler.written) | {(f"{dest.prefix}odd", 1)}
    if dest.kind != "postgres":  # VictoriaMetrics skips the string; the lake keeps the JSON text
        expected.add((f"{dest.prefix}odd", 0))
    got = wait_all(dest, expected)
    metrics = wait_until(
        lambda: (m := scrape(dest.metrics_port())).get("iotnode_sink_lag_records") == 0 and m, 15
    )
    assert isinstance(metrics, dict)
    if dest.kind == "postgres":
        assert metrics.get("iotnode_errors_total,reason=rejected,stage=postgres") == 1
        assert (f"{dest.prefix}odd", 0) not in got
        assert "refused by PostgreSQL" in processes.log(dest.kind)
    assert_exactly_once([g for g in got if g in expected], expected)
    filler.close()
