"""The harness measures what it says: real baseline servers, real generator
processes, loopback only, every run bounded (seconds, not minutes)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import proto, runner, targets
from bench.runner import Scenario, Target


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def noop(workdir: Path) -> Iterator[Target]:
    with targets.start("noop", workdir / "noop", 1) as t:
        yield t


@pytest.fixture(scope="module")
def slow(workdir: Path) -> Iterator[Target]:
    with targets.start("noop", workdir / "slow", 1, ack_delay_ms=20) as t:
        yield t


@pytest.fixture(scope="module")
def coalescing(workdir: Path) -> Iterator[Target]:
    # A short delay so that several messages are waiting when the ack goes out.
    with targets.start("noop", workdir / "coalesce", 1, ack_delay_ms=5, coalesce=True) as t:
        yield t


def _run(target: Target, workdir: Path, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(
        name="test", connections=4, rate=50.0, duration=1.0, ramp=500.0, processes=1, drain=3.0
    )
    base.update(kw)
    return runner.run(Scenario(**base), target, workdir / "logs", progress=None)


def test_slowed_server_shows_its_ack_delay_in_the_percentiles(
    noop: Target, slow: Target, workdir: Path
) -> None:
    fast = _run(noop, workdir)
    delayed = _run(slow, workdir)
    assert fast["acked"] == fast["sent"] > 0 and delayed["acked"] == delayed["sent"] > 0
    assert delayed["latency_ms"]["p50"] >= 19.5, delayed["latency_ms"]
    assert delayed["latency_ms"]["p50"] - fast["latency_ms"]["p50"] >= 15.0, (
        fast["latency_ms"],
        delayed["latency_ms"],
    )
    assert delayed["latency_ms"]["p99"] < 1000.0, delayed["latency_ms"]


def test_pacing_offers_200_msgs_per_second_for_2_seconds_as_400_messages(noop: Target, workdir: Path) -> None:
    r = _run(noop, workdir, connections=1, rate=200.0, duration=2.0)
    assert 396 <= r["sent"] <= 404, r["sent"]
    assert r["acked"] == r["sent"]
    assert r["offered_msg_s"] == 200.0
    assert 190 <= r["acked_msg_s"] <= 210, r["acked_msg_s"]


def test_pacing_spreads_many_connections_over_generator_processes(noop: Target, workdir: Path) -> None:
    r = _run(noop, workdir, connections=60, rate=10.0, duration=2.0, processes=2, sources=3)
    assert r["connections_open"] == 60
    assert r["generator"]["processes"] == 2
    assert 1188 <= r["sent"] <= 1212, r["sent"]  # 60 x 10/s x 2 s
    assert r["acked"] == r["sent"] and r["errors"] == 0


def test_latency_is_measured_from_the_scheduled_send_so_a_stalled_window_shows(
    slow: Target, workdir: Path
) -> None:
    # One message in flight, 20 ms per ack: at most ~50/s get through, 100/s are offered.
    # A closed-loop measurement would report ~20 ms; measured from the schedule the
    # queue that builds up over 1.5 s shows as latency, not as a lower offered rate.
    r = _run(slow, workdir, connections=1, rate=100.0, window=1, duration=1.5, drain=5.0)
    assert r["latency_ms"]["p50"] >= 20.0
    assert r["latency_ms"]["max"] >= 400.0, r["latency_ms"]
    assert r["acked"] + r["unacked"] >= 148  # everything offered is accounted for


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_json_and_msgpack_messages_are_both_acked(noop: Target, workdir: Path, encoding: str) -> None:
    r = _run(noop, workdir, encoding=encoding, payload=200)
    assert r["sent"] > 0 and r["acked"] == r["sent"], r
    assert r["errors"] == 0, r["error_samples"]
    assert r["latency_ms"]["count"] == r["acked"]


def test_coalesced_acks_resolve_every_covered_message(coalescing: Target, workdir: Path) -> None:
    # 2000/s per connection: each 2 ms tick writes 4 messages in one burst.
    r = _run(coalescing, workdir, connections=2, rate=2000.0, duration=1.0)
    assert r["acked"] == r["sent"] > 2000, r
    assert r["latency_ms"]["count"] == r["acked"]  # one latency per message, not per ack
    assert r["ack_frames"] < r["acked"] / 2, (r["ack_frames"], r["acked"])


def test_a_dropped_connection_is_reopened_and_its_unacked_messages_resent(workdir: Path) -> None:
    with targets.start("noop", workdir / "dropping", 1, close_after=25) as t:
        r = _run(t, workdir, connections=2, rate=40.0, duration=1.0)
    assert r["reconnects"] >= 2, r  # each connection dropped at least once
    assert r["unacked"] == 0, r
    assert r["acked"] == r["latency_ms"]["count"] >= 78  # 2 x 40/s x 1 s, every message acked once
    assert r["sent"] >= r["acked"]  # resends are sent again
    assert any("1012" in e for e in r["error_samples"]), r["error_samples"]


def test_closed_loop_keeps_the_window_full_and_reports_throughput(noop: Target, workdir: Path) -> None:
    r = _run(noop, workdir, mode="max", connections=4, window=8, duration=1.5)
    assert r["acked_msg_s"] > 200, r["acked_msg_s"]
    assert r["errors"] == 0
    assert r["in_flight_at_end"] <= 4 * 8


def test_a_bad_token_is_refused_at_the_handshake_and_reported(noop: Target, workdir: Path) -> None:
    wrong = Target("noop", noop.url, secret="not-the-secret-0123456789abcdef-xyz")
    with pytest.raises(proto.BenchError, match="no connection could be opened"):
        _run(wrong, workdir, connections=2)


def test_generator_and_target_cpu_are_reported(noop: Target, workdir: Path) -> None:
    r = _run(noop, workdir, connections=20, rate=50.0)
    assert r["generator"]["cpu_s"] > 0
    assert r["generator"]["max_lag_ms"] >= 0.0 and all("gen_lag_ms" in t for t in r["timeline"])
    # the generator's own GC pauses, per generation (its loop stalls would count as latency)
    gc_count, gc_max = r["generator"]["gc_collections"], r["generator"]["gc_max_ms"]
    assert len(gc_count) == len(gc_max) == 3 and all(n >= 0 for n in gc_count)
    assert all(worst == 0.0 for n, worst in zip(gc_count, gc_max, strict=True) if n == 0)
    assert r["target_procs"]["cpu_s"], "the target's processes were sampled"
    assert any(s["procs"] for s in r["target_procs"]["samples"])


@pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="mosquitto not installed",
)
def test_mosquitto_qos1_publishes_are_all_pubacked_on_loopback(workdir: Path) -> None:
    with targets.start("mosquitto", workdir / "mosquitto", 1) as t:
        addrs = targets.listening_addresses(t.pids)
        assert addrs and all(a.startswith(("127.", "[::ffff:127.")) for a in addrs), addrs
        r = _run(t, workdir, connections=4, rate=50.0)
    assert r["sent"] > 0 and r["acked"] == r["sent"], r
    assert r["errors"] == 0, r["error_samples"]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_redis_front_acks_after_xadd(workdir: Path) -> None:
    with targets.start("redis", workdir / "redis", 1) as t:
        r = _run(t, workdir, connections=4, rate=50.0)
    assert r["sent"] > 0 and r["acked"] == r["sent"], r
    aof = list((workdir / "redis" / "redis").rglob("*.aof*"))
    assert aof and sum(p.stat().st_size for p in aof if p.is_file()) > 0, "XADDs reached the append-only file"


@pytest.mark.parametrize("name", ["front-pmem", "front-msync"])
def test_front_alone_targets_ack_after_their_ring_and_clean_up(name: str, workdir: Path) -> None:
    import glob

    with targets.start(name, workdir / name, 1) as t:
        r = _run(t, workdir, connections=4, rate=50.0)
        shm = glob.glob("/dev/shm/iotnode-bench-*")
        ring = (
            [Path(p) / "ingress.ring" for p in shm]
            if name == "front-pmem"
            else [workdir / name / "data" / "ingress.ring"]
        )
        assert any(p.exists() for p in ring), f"{name}: no ingress ring at {ring}"
    assert r["sent"] > 0 and r["acked"] == r["sent"], r
    if name == "front-pmem":
        assert not any(Path(p).exists() for p in shm), "the /dev/shm data dir was left behind"


def test_cli_against_a_running_endpoint_writes_json_and_an_html_report(noop: Target, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from bench.runner import REPO

    secret_dir = tmp_path / "node-data"
    secret_dir.mkdir()
    (secret_dir / "jwt_secret").write_text(targets.SECRET)
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "c10k",
        "--url",
        noop.url,
        "--data-dir",
        str(secret_dir),
        "-n",
        "3",
        "-r",
        "20",
        "-d",
        "1",
        "-p",
        "1",
        "--ramp",
        "100",
        "-q",
        "--out",
        str(out),
        "--pid",
        str(noop.pids[0]),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "| url |" in done.stdout
    (json_path,) = out.glob("*-c10k-url.json")
    doc = json.loads(json_path.read_text())
    r = doc["results"][0]
    assert r["sent"] == r["acked"] == 60 and doc["command"].startswith("python -m bench c10k --url")
    assert r["target_procs"]["cpu_s_by_role"], "the --pid tree was sampled"
    html = json_path.with_suffix(".html").read_text()
    assert html.count("<svg") >= 3 and "Ack latency by percentile" in html
    # matplotlib charts, PNG and SVG, next to the JSON
    base = json_path.with_suffix("")
    for chart in ("latency", "throughput", "p99"):
        png, svg = base.with_name(f"{base.name}-{chart}.png"), base.with_name(f"{base.name}-{chart}.svg")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, chart
        assert "<svg" in svg.read_text()
    assert "Ack latency by percentile" in base.with_name(f"{base.name}-latency.svg").read_text()
    png_before = base.with_name(f"{base.name}-latency.png").stat().st_mtime_ns
    again = subprocess.run(
        [sys.executable, "-m", "bench", "report", str(json_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 0 and again.stdout.strip().endswith(".html")
    assert f"{base.name}-latency.png" in again.stdout  # the charts are drawn again too
    assert base.with_name(f"{base.name}-latency.png").stat().st_mtime_ns >= png_before


def test_cli_refuses_a_target_off_loopback_with_the_url(tmp_path: Path) -> None:
    import subprocess
    import sys

    from bench.runner import REPO

    cmd = [
        sys.executable,
        "-m",
        "bench",
        "c10k",
        "--url",
        "ws://192.0.2.1:8000/v1/ingest",
        "--secret",
        "x" * 32,
        "-q",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "192.0.2.1" in done.stderr
