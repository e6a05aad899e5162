"""The storage tier's configuration variables (node/config.py): read once, typed, failing loudly."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import Settings
from node.errors import ConfigError
from tests.support import REPO


def test_storage_is_off_by_default() -> None:
    s = Settings.from_env({})
    assert (s.device_registry, s.pg_dsn, s.vm_url, s.lake_dir) == (None, None, None, None)
    assert (s.metrics_port_postgres, s.metrics_port_victoria, s.metrics_port_lake) == (9105, 9106, 9107)
    assert (s.lake_flush_rows, s.lake_flush_seconds, s.sink_batch_rows) == (100_000, 60.0, 5000)


def test_storage_variables_are_read(tmp_path: Path) -> None:
    s = Settings.from_env(
        {
            "NODE_DEVICE_REGISTRY": str(REPO / "examples" / "devices.json"),
            "NODE_PG_DSN": "host=127.0.0.1 dbname=iot password=secret",
            "NODE_VM_URL": "http://127.0.0.1:8428/",
            "NODE_LAKE_DIR": str(tmp_path / "lake"),
            "NODE_LAKE_FLUSH_ROWS": "500",
            "NODE_LAKE_FLUSH_SECONDS": "2.5",
            "NODE_SINK_BATCH_ROWS": "100",
            "NODE_METRICS_PORT_LAKE": "9200",
        }
    )
    assert s.device_registry == REPO / "examples" / "devices.json"
    assert s.vm_url == "http://127.0.0.1:8428"
    assert (s.lake_dir, s.lake_flush_rows, s.lake_flush_seconds) == (tmp_path / "lake", 500, 2.5)
    assert (s.sink_batch_rows, s.metrics_port_lake) == (100, 9200)
    assert "secret" not in repr(s)


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("NODE_DEVICE_REGISTRY", "devices.yaml", "expected a .csv or .json file"),
        ("NODE_DEVICE_REGISTRY", "/nonexistent/devices.csv", "expected an existing file"),
        ("NODE_VM_URL", "ftp://x", "expected http://HOST:PORT"),
        ("NODE_VM_URL", "http://h:99999", "expected http://HOST:PORT"),
        ("NODE_LAKE_FLUSH_ROWS", "0", "expected an integer >= 1"),
        ("NODE_SINK_BATCH_ROWS", "many", "expected an integer"),
        ("NODE_METRICS_PORT_VICTORIA", "9104", "port already used by NODE_METRICS_PORT_STORE"),
    ],
)
def test_bad_storage_value_names_the_variable_and_the_value(variable: str, value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({variable: value})
    assert err.value.variable == variable
    assert reason in str(err.value)


def test_a_bad_dsn_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"NODE_PG_DSN": "   "})
    assert err.value.value == "<hidden>"


def _procfile(name: str) -> dict[str, str]:
    entries = {}
    for line in (REPO / name).read_text().splitlines():
        key, sep, command = line.partition(":")
        if sep and key.strip() and not key.startswith("#"):
            entries[key.strip()] = command.strip()
    return entries


def test_honcho_start_runs_no_storage_sink_and_procfile_storage_runs_each() -> None:
    # `honcho start` with nothing configured must stay the SQLite-only node (contract 1)
    assert set(_procfile("Procfile")) == {"web", "monitor", "router", "publisher", "store", "fanout"}
    assert _procfile("Procfile.storage") == {
        name: f"python -m node.workers.{name}" for name in ("postgres", "victoria", "lake")
    }
