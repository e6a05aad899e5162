"""The issue-14 variables: defaults, typed parsing, and a bad value naming the
variable and the value (node/config.py's rule)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import MIN_SECRET_BYTES, Settings
from node.errors import ConfigError


def test_defaults() -> None:
    s = Settings.from_env({})
    assert (s.metrics_host, s.max_header_bytes, s.handshake_timeout) == ("127.0.0.1", 16384, 10.0)
    assert (s.max_connections, s.max_connections_per_ip) == (16384, 8192)
    assert (s.ws_max_queued_frames, s.ws_max_unwritten_bytes, s.tcp_user_timeout_ms) == (32, 262144, 60000)
    assert (s.jwt_require_exp, s.jwt_max_ttl, s.jwt_denylist) == (False, None, None)
    assert s.fanout_queue_bytes == 8 << 20


def test_values_are_parsed(tmp_path: Path) -> None:
    denylist = tmp_path / "deny"
    denylist.write_text("")
    s = Settings.from_env(
        {
            "NODE_METRICS_HOST": "0.0.0.0",
            "NODE_MAX_HEADER_BYTES": "8192",
            "NODE_HANDSHAKE_TIMEOUT": "2.5",
            "NODE_MAX_CONNECTIONS": "100",
            "NODE_MAX_CONNECTIONS_PER_IP": "10",
            "NODE_WS_MAX_QUEUED_FRAMES": "8",
            "NODE_WS_MAX_UNWRITTEN_BYTES": "65536",
            "NODE_TCP_USER_TIMEOUT_MS": "0",
            "NODE_JWT_REQUIRE_EXP": "on",
            "NODE_JWT_MAX_TTL": "86400",
            "NODE_JWT_DENYLIST": str(denylist),
            "NODE_FANOUT_QUEUE_BYTES": "1048576",
        }
    )
    assert s.metrics_host == "0.0.0.0" and s.max_header_bytes == 8192 and s.handshake_timeout == 2.5
    assert (s.max_connections, s.max_connections_per_ip, s.ws_max_queued_frames) == (100, 10, 8)
    assert (s.ws_max_unwritten_bytes, s.tcp_user_timeout_ms) == (65536, 0)
    assert s.jwt_require_exp and s.jwt_max_ttl == 86400.0 and s.jwt_denylist == denylist
    assert s.fanout_queue_bytes == 1 << 20


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("NODE_MAX_HEADER_BYTES", "100"),
        ("NODE_HANDSHAKE_TIMEOUT", "0"),
        ("NODE_HANDSHAKE_TIMEOUT", "soon"),
        ("NODE_MAX_CONNECTIONS", "0"),
        ("NODE_MAX_CONNECTIONS_PER_IP", "-1"),
        ("NODE_WS_MAX_QUEUED_FRAMES", "0"),
        ("NODE_WS_MAX_UNWRITTEN_BYTES", "10"),
        ("NODE_TCP_USER_TIMEOUT_MS", "-5"),
        ("NODE_JWT_REQUIRE_EXP", "yes"),
        ("NODE_JWT_MAX_TTL", "0"),
        ("NODE_JWT_DENYLIST", "/nonexistent/denylist"),
        ("NODE_FANOUT_QUEUE_BYTES", "10"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_value(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    assert info.value.variable == variable and info.value.value == value


def test_a_31_byte_secret_is_refused_and_32_accepted() -> None:
    with pytest.raises(ConfigError, match=f"at least {MIN_SECRET_BYTES} bytes"):
        Settings.from_env({"NODE_JWT_SECRET": "s" * 31})
    assert Settings.from_env({"NODE_JWT_SECRET": "s" * 32}).jwt_secret == "s" * 32
