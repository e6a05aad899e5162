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
    assert (
        s.metrics_port_monitor,
        s.metrics_port_router,
        s.metrics_port_publisher,
        s.metrics_port_store,
    ) == (
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
    assert (s.data_dir, s.host, s.web_port, s.fanout_port, s.web_workers) == (
        Path("/tmp/x"),
        "0.0.0.0",
        18000,
        18001,
        3,
    )
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
        ("NODE_MONITOR_BATCH_RECORDS", "0", ">= 1"),
        ("NODE_MONITOR_BATCH_RECORDS", "many", "expected an integer"),
        ("NODE_MONITOR_BATCH_BYTES", "100", ">= 1024"),
        ("NODE_MONITOR_WINDOW", "5000", "<= 1024"),
        ("NODE_MONITOR_ACK_TIMEOUT", "0", ">= 0.01"),
        ("NODE_MONITOR_ACK_TIMEOUT", "soon", "expected a number"),
        ("NODE_MONITOR_ACK_TIMEOUT_MAX", "inf", "finite"),
        ("NODE_PIPELINE_COALESCE_MS", "-1", ">= 0"),
        ("NODE_PIPELINE_COALESCE_MS", "2000", "<= 1000"),
        ("NODE_PIPELINE_COALESCE_MS", "soon", "expected a number"),
        ("NODE_WEB_COMMIT_INTERVAL_MS", "-1", ">= 0"),
        ("NODE_WEB_COMMIT_INTERVAL_MS", "101", "<= 100"),
        ("NODE_ROUTER_GATHER_BATCHES", "0", ">= 1"),
        ("NODE_ROUTER_GATHER_BYTES", "4 MiB", "expected an integer"),
        ("NODE_ROUTER_RCVHWM", "-1", ">= 1"),
        ("NODE_CURVE", "maybe", "expected one of on, off"),
        ("NODE_CURVE_SERVER_KEY", "short", "40-character Z85 key, got 5"),
        ("NODE_CURVE_SERVER_KEY", "~" * 40, "Z85 alphabet"),
        ("NODE_CURVE_CLIENTS_DIR", "/nonexistent/iotnode-clients", "expected an existing directory"),
        ("NODE_CURVE_SUBSCRIBERS_DIR", "/nonexistent/iotnode-subs", "expected an existing directory"),
        ("NODE_CURVE_PUBLISHER_KEY", "short", "40-character Z85 key, got 5"),
        ("NODE_PUB_CONNECT", "udp://x:1", "ipc:// or tcp://"),
    ],
)
def test_bad_value_names_the_variable_and_the_value(variable: str, value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    assert info.value.variable == variable
    assert info.value.value == value
    assert reason in str(info.value)
    assert variable in str(info.value) and repr(value) in str(info.value)


def test_monitor_and_router_tunables_default_to_the_former_constants_and_are_read() -> None:
    d = Settings.from_env({})
    assert (d.monitor_batch_records, d.monitor_batch_bytes, d.monitor_window) == (256, 1 << 20, 8)
    assert (d.monitor_ack_timeout, d.monitor_ack_timeout_max) == (1.0, 8.0)
    assert (d.router_gather_batches, d.router_gather_bytes, d.router_rcvhwm) == (32, 4 << 20, 64)
    s = Settings.from_env(
        {
            "NODE_MONITOR_BATCH_RECORDS": "64",
            "NODE_MONITOR_BATCH_BYTES": "65536",
            "NODE_MONITOR_WINDOW": "16",
            "NODE_MONITOR_ACK_TIMEOUT": "0.5",
            "NODE_MONITOR_ACK_TIMEOUT_MAX": "30",
            "NODE_ROUTER_GATHER_BATCHES": "8",
            "NODE_ROUTER_GATHER_BYTES": "1048576",
            "NODE_ROUTER_RCVHWM": "256",
        }
    )
    assert (s.monitor_batch_records, s.monitor_batch_bytes, s.monitor_window) == (64, 65536, 16)
    assert (s.monitor_ack_timeout, s.monitor_ack_timeout_max) == (0.5, 30.0)
    assert (s.router_gather_batches, s.router_gather_bytes, s.router_rcvhwm) == (8, 1 << 20, 256)


def test_pipeline_coalesce_is_read_in_milliseconds_and_defaults_to_5() -> None:
    assert Settings.from_env({}).pipeline_coalesce == 0.005
    assert Settings.from_env({"NODE_PIPELINE_COALESCE_MS": "0"}).pipeline_coalesce == 0.0
    assert Settings.from_env({"NODE_PIPELINE_COALESCE_MS": "2.5"}).pipeline_coalesce == 0.0025
    assert Settings.from_env({}).web_commit_interval == 0.001
    assert Settings.from_env({"NODE_WEB_COMMIT_INTERVAL_MS": "0"}).web_commit_interval == 0.0


def test_ack_timeout_ceiling_below_the_timeout_is_refused_and_an_unset_one_follows_it() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"NODE_MONITOR_ACK_TIMEOUT": "3", "NODE_MONITOR_ACK_TIMEOUT_MAX": "2"})
    assert (info.value.variable, info.value.value) == ("NODE_MONITOR_ACK_TIMEOUT_MAX", "2")
    assert "expected a number >= NODE_MONITOR_ACK_TIMEOUT (3)" in str(info.value)
    assert Settings.from_env({"NODE_MONITOR_ACK_TIMEOUT": "20"}).monitor_ack_timeout_max == 20.0


def test_bad_monitor_tunable_exits_2_before_the_monitor_starts(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "node.workers.monitor"],
        env={
            "NODE_MONITOR_WINDOW": "0",
            "NODE_DATA_DIR": str(tmp_path),
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "NODE_MONITOR_WINDOW='0': expected an integer >= 1" in proc.stderr
    assert not (tmp_path / "ingress.ring").exists()


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


def test_curve_is_on_by_default_and_a_tcp_link_without_keys_names_what_to_set(tmp_path: Path) -> None:
    d = Settings.from_env({})
    assert d.curve is True and d.curve_server_key is None and d.curve_clients_dir is None
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"NODE_ROUTER_BIND": "tcp://0.0.0.0:5555"})
    assert info.value.variable == "NODE_CURVE_CLIENTS_DIR" and "NODE_CURVE=off" in info.value.reason
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"NODE_ROUTER_CONNECT": "tcp://router:5555"})
    assert info.value.variable == "NODE_CURVE_SERVER_KEY" and "curve_server.key" in info.value.reason
    # the node's own monitor of a tcp:// router needs no server key (it is in the data dir)
    assert Settings.from_env(
        {"NODE_ROUTER_BIND": "tcp://0.0.0.0:5555", "NODE_CURVE_CLIENTS_DIR": str(tmp_path)}
    )
    assert Settings.from_env({"NODE_ROUTER_BIND": "tcp://0.0.0.0:5555", "NODE_CURVE": "off"}).curve is False
    assert Settings.from_env({"NODE_PUB_BIND": "tcp://127.0.0.1:5556"}).pub_bind == "tcp://127.0.0.1:5556"
    assert Settings.from_env({"NODE_PUB_BIND": "tcp://0.0.0.0:5556", "NODE_CURVE": "off"}).pub_bind
    # a publisher bind other hosts can reach needs the subscribers' keys; a remote one, its key
    for var in ("NODE_PUB_BIND", "NODE_REPLAY_BIND"):
        with pytest.raises(ConfigError) as info:
            Settings.from_env({var: "tcp://0.0.0.0:5556"})
        assert info.value.variable == "NODE_CURVE_SUBSCRIBERS_DIR" and var in info.value.reason
        assert Settings.from_env({var: "tcp://0.0.0.0:5556", "NODE_CURVE_SUBSCRIBERS_DIR": str(tmp_path)})
    for var in ("NODE_PUB_CONNECT", "NODE_REPLAY_CONNECT"):
        with pytest.raises(ConfigError) as info:
            Settings.from_env({var: "tcp://middle:5556"})
        assert info.value.variable == "NODE_CURVE_PUBLISHER_KEY" and "curve_server.key" in info.value.reason
    s = Settings.from_env({"NODE_PUB_BIND": "tcp://127.0.0.1:5556"})
    assert s.pub_connect_endpoint == "tcp://127.0.0.1:5556" and s.replay_connect_endpoint == s.replay_endpoint


def test_curve_server_key_is_read_from_z85_text_or_a_key_file(tmp_path: Path) -> None:
    import zmq

    public, _ = zmq.curve_keypair()
    key_file = tmp_path / "router.key"
    key_file.write_text(f'# comment\nmetadata\ncurve\n    public-key = "{public.decode()}"\n')
    env = {"NODE_ROUTER_CONNECT": "tcp://router:5555"}
    assert Settings.from_env({**env, "NODE_CURVE_SERVER_KEY": public.decode()}).curve_server_key == public
    assert Settings.from_env({**env, "NODE_CURVE_SERVER_KEY": str(key_file)}).curve_server_key == public
    key_file.write_text("metadata\ncurve\n")
    with pytest.raises(ConfigError, match="NODE_CURVE_SERVER_KEY.*no public-key"):
        Settings.from_env({**env, "NODE_CURVE_SERVER_KEY": str(key_file)})
