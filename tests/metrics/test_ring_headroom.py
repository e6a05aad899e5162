"""Ring fill ratio and outage headroom: the arithmetic (node.headroom) and a real monitor's /metrics."""

from __future__ import annotations

import math
import time
import urllib.request
from pathlib import Path

from node.headroom import FillRate, outage_seconds, record_bytes
from node.record import pack_record
from tests.pipeline.conftest import INGRESS_BYTES, IngressProducer
from tests.support import REPO, Processes, node_env, wait_for_port, wait_until


def test_a_record_takes_header_plus_envelope_aligned_to_32_bytes() -> None:
    assert [record_bytes(n) for n in (0, 1, 32, 33, 57, 64, 65)] == [32, 64, 64, 96, 96, 96, 128]


def test_the_default_rings_cover_the_outage_the_readme_states_at_10k_messages_a_second() -> None:
    envelope = pack_record("sensor-000001", 1_764_150_000_000_000, 1764150000.5, 1764150000.6, {"temp": 21.5})
    size = record_bytes(len(envelope))
    assert size == 96
    ingress = outage_seconds(64 << 20, size, 10_000)
    fanin = outage_seconds(256 << 20, size, 10_000)
    assert round(ingress) == 70 and round(fanin) == 280
    assert round(outage_seconds(4 << 30, size, 10_000) / 60) == 75
    readme = (REPO / "README.md").read_text()
    for text in ("96 bytes", "about 70 s", "about 4.7 minutes", "75 minutes"):
        assert text in readme, f"README no longer says {text!r}: update it with the numbers above"
    assert outage_seconds(64 << 20, size, 0) == math.inf


def test_fill_rate_is_the_tail_growth_over_the_window_and_idle_means_infinite_headroom() -> None:
    rate = FillRate(window=10.0)
    assert rate.headroom(0.0, 0, 1000, 0) == math.inf  # one sample: no rate yet
    assert rate.observe(0.5, 50) == 0.0  # shorter than MIN_SPAN: not a rate yet
    assert rate.observe(2.0, 200) == 100.0
    assert rate.headroom(4.0, 400, 1000, 400) == 6.0  # 600 free bytes at 100 B/s
    assert rate.observe(30.0, 400) < 100.0  # old samples leave the window: the rate follows
    assert rate.observe(50.0, 400) == 0.0
    assert rate.headroom(51.0, 400, 1000, 400) == math.inf


def scrape(port: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("iotnode_ring_") and 'ring="ingress"' in line:
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def test_monitor_exports_fill_ratio_and_headroom_while_its_router_is_down_until_the_ring_is_full(
    data_dir: Path, tmp_path: Path, processes: Processes
) -> None:
    env = node_env(data_dir)  # no router runs: the monitor pops nothing, as in a middle-tier outage
    producer = IngressProducer(data_dir / "ingress.ring")
    try:
        processes.start("monitor", "node.workers.monitor", env, tmp_path)
        port = env["NODE_METRICS_PORT_MONITOR"]
        wait_for_port(int(port))
        time.sleep(1.1)
        idle = scrape(port)
        assert idle["iotnode_ring_fill_ratio"] == 0.0 and idle["iotnode_ring_headroom_seconds"] == math.inf
        tail0, t0 = producer.ring.tail, time.monotonic()
        for _ in range(20):  # ~100 records every 0.1 s
            producer.append(100)
            time.sleep(0.1)
        got = scrape(port)
        rate = (producer.ring.tail - tail0) / (time.monotonic() - t0)
        used = producer.ring.bytes_used
        assert abs(got["iotnode_ring_fill_ratio"] - used / INGRESS_BYTES) < 0.01
        expected = (INGRESS_BYTES - used) / rate
        assert expected / 2 < got["iotnode_ring_headroom_seconds"] < expected * 2, (got, expected)
        # Keep appending until the ring refuses: the front would push back now.
        deadline = time.monotonic() + 30
        while producer.ring.append_batch([pack_record("dev0", 10**6, None, 0.0, {"pad": "x" * 200})] * 64):
            assert time.monotonic() < deadline, "the ingress ring never filled"
        # a scrape may get the previous render again for up to 10x its cost (issue 14's
        # bounded /metrics): wait for a fresh one
        full = wait_until(lambda: (s := scrape(port)) and s["iotnode_ring_fill_ratio"] > 0.99 and s, 5)
        assert isinstance(full, dict)
        assert full["iotnode_ring_headroom_seconds"] < 1.0
    finally:
        producer.close()
