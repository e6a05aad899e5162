"""``python -m node.client`` and ``examples/simulator.py`` as real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from typing import Any

from node.auth import issue_device_token
from tests.client.conftest import Node
from tests.client.test_client_front import ring_records
from tests.client.test_outbox_node import client_env
from tests.support import REPO


def cli(node: Node, stdin: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.client", "--url", node.url, *args],
        input=stdin, capture_output=True, text=True, env=client_env(), cwd=str(REPO), timeout=timeout,
    )  # fmt: skip


def summary_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return json.loads(result.stderr.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_cli_sends_every_stdin_line_and_prints_one_ack_per_line(shared_front: Node) -> None:
    front = shared_front
    lines = "".join(json.dumps({"temp": 20 + i / 10}) + "\n" for i in range(50))
    result = cli(front, lines, "--token", front.token("cli-1"), "--print-acks")
    assert result.returncode == 0, result.stderr
    acks = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(a["line"] for a in acks) == list(range(1, 51))
    seqs = sorted(a["ack"] for a in acks)
    assert seqs == list(range(seqs[0], seqs[0] + 50))
    summary = summary_of(result)
    assert (summary["sent"], summary["acked"], summary["unacked"], summary["invalid_lines"]) == (50, 50, 0, 0)


def test_cli_envelope_lines_json_frames_and_bad_lines_named_by_number(shared_front: Node) -> None:
    front = shared_front
    stdin = '{"data": {"t": 1}, "ts": 1700000000}\nnot json\n{"no_data": 1}\n{"data": [1, 2]}\n'
    result = cli(front, stdin, "--token", front.token("cli-2"), "--envelope", "--json")
    assert result.returncode == 1  # some lines were invalid
    assert "line 2: not JSON" in result.stderr
    assert 'line 3: expected an object with a "data" key' in result.stderr
    summary = summary_of(result)
    assert (summary["sent"], summary["acked"], summary["invalid_lines"]) == (2, 2, 2)


def test_cli_refused_token_exits_2_with_the_status(shared_front: Node) -> None:
    front = shared_front
    token = issue_device_token("some-other-secret-0123456789-0123456789", "cli-3")
    result = cli(front, '{"a": 1}\n', "--token", token, timeout=30)
    assert result.returncode == 2
    assert "refused the connection" in result.stderr and "HTTP 401" in result.stderr


def test_cli_device_option_signs_a_token_with_the_local_node_secret(shared_front: Node) -> None:
    front = shared_front
    env = client_env() | {"NODE_JWT_SECRET": front.secret}
    result = subprocess.run(
        [sys.executable, "-m", "node.client", "--url", front.url, "--device", "cli-4"],
        input='{"a": 1}\n', capture_output=True, text=True, env=env, cwd=str(REPO), timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert summary_of(result)["acked"] == 1


def test_cli_without_any_token_source_exits_with_a_clear_message(shared_front: Node) -> None:
    front = shared_front
    result = cli(front, "", timeout=30)
    assert result.returncode != 0
    assert "give --token, --token-file, or --device" in result.stderr


def test_cli_bad_option_value_exits_2_naming_it(shared_front: Node) -> None:
    front = shared_front
    result = cli(front, "", "--token", "x", "--window", "0", timeout=30)
    assert result.returncode == 2
    assert "window must be an integer >= 1, got 0" in result.stderr


def test_simulator_sensors_send_realistic_readings_that_are_all_acked(front: Node) -> None:
    env = client_env() | {k: v for k, v in front.env.items() if k.startswith("NODE_")}
    result = subprocess.run(
        [sys.executable, "examples/simulator.py", "--url", front.url, "--sensors", "50", "--duration", "2",
         "--interval", "0.5", "--seed", "1"],
        capture_output=True, text=True, env=env, cwd=str(REPO), timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["sensors"] == 50
    assert summary["sent"] >= 50 * 2  # at least ~2 readings each in 2 s at 0.5 s
    assert summary["acked"] == summary["sent"] and summary["rejected"] == 0
    # What reached the ingress ring looks like sensor data.
    front.kill_front()
    records = ring_records(front)
    assert len({r.device_id for r in records}) == 50
    kinds = Counter(r.data["type"] for r in records)
    assert kinds["env"] > 0 and kinds["gps"] > 0
    for r in records:
        assert isinstance(r.ts, float) and abs(r.ts - r.received_at) < 30
        if r.data["type"] == "env":
            assert -20 < r.data["temperature_c"] < 50 and 0 <= r.data["humidity_pct"] <= 100
        else:
            assert 48 < r.data["lat"] < 50 and 1 < r.data["lon"] < 4 and 0 <= r.data["speed_kmh"] <= 90
