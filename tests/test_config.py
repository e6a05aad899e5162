"""node.config: defaults, every variable parsed once, bad values named with their value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.config import ConfigError, Settings
from tests.support import REPO


def test_defaults_match_the_contract() -> None:
    s = Settings.from_env({})
    assert (s.data_dir, s.host, s.web_port, s.fanout_port) == (Path("./data"), "127.0.0.1", 8000, 8001)
    assert s.jwt_secret is None and s.max_message_bytes == 65536
    assert (s.metrics_port_monitor, s.metrics_port_router, s.metrics_port_publisher, s.metrics_port_store) == (
        9101,
        9102,
        9103,
        9104,
    )
    assert s.web_workers >= 1
    assert s.durability == "power"
    assert s.router_bind_endpoint == f"ipc://{Path('data').resolve() / 'router.sock'}"
    assert s.router_connect_endpoint == s.router_bind_endpoint


def test_every_contract_variable_is_read() -> None:
    s = Settings.from_env(
        {
            "NODE_DATA_DIR": "/tmp/x",
            "NODE_HOST": "0.0.0.0",
            "NODE_WEB_PORT": "18000",
            "NODE_FANOUT_PORT": "18001",
            "NODE_WEB_WORKERS": "3",
            "NODE_JWT_SECRET": "s" * 32,
            "NODE_MAX_MESSAGE_BYTES": "1024",
            "NODE_METRICS_PORT_MONITOR": "19101",
            "NODE_METRICS_PORT_ROUTER": "19102",
            "NODE_METRICS_PORT_PUBLISHER": "19103",
            "NODE_METRICS_PORT_STORE": "19104",
        }
    )
    assert (s.data_dir, s.host, s.web_port, s.fanout_port, s.web_workers) == (Path("/tmp/x"), "0.0.0.0", 18000, 18001, 3)
    assert s.jwt_secret == "s" * 32 and s.max_message_bytes == 1024
    assert (s.metrics_port_monitor, s.metrics_port_store) == (19101, 19104)


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("NODE_WEB_PORT", "http", "expected an integer"),
        ("NODE_WEB_PORT", "70000", "<= 65535"),
        ("NODE_WEB_WORKERS", "0", ">= 1"),
        ("NODE_MAX_MESSAGE_BYTES", "-5", ">= 64"),
        ("NODE_INGRESS_RING_BYTES", "3000000", "power of two"),
        ("NODE_DURABILITY", "maybe", "expected one of power, process"),
        ("NODE_ROUTER_BIND", "udp://x:1", "ipc:// or tcp://"),
        ("NODE_ROUTER_BIND", "tcp://127.0.0.1:notaport", "expected an integer"),
        ("NODE_WS_PING_INTERVAL", "nan", "finite"),
    ],
)
def test_bad_value_names_the_variable_and_the_value(variable: str, value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    assert info.value.variable == variable
    assert info.value.value == value
    assert reason in str(info.value)
    assert variable in str(info.value) and repr(value) in str(info.value)


def test_short_secret_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"NODE_JWT_SECRET": "hunter2"})
    assert "hunter2" not in str(info.value)
    assert "NODE_JWT_SECRET" in str(info.value)


def test_two_processes_on_one_port_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="NODE_FANOUT_PORT.*already used by NODE_WEB_PORT"):
        Settings.from_env({"NODE_WEB_PORT": "8100", "NODE_FANOUT_PORT": "8100"})


def test_a_data_dir_too_long_for_ipc_sockets_is_refused() -> None:
    with pytest.raises(ConfigError, match="NODE_DATA_DIR.*exceed 107 bytes"):
        Settings.from_env({"NODE_DATA_DIR": "/tmp/" + "d" * 120})


def test_load_settings_exits_2_with_a_message_naming_the_variable() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from node.config import load_settings; load_settings()"],
        env={"NODE_WEB_PORT": "eighty", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "NODE_WEB_PORT='eighty'" in proc.stderr
