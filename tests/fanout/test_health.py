"""node.fanout.health without a node: quantiles, rates from counter deltas, and the
shared once-a-second scrape against small real HTTP servers (one dead, one silent)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from node.fanout.health import (
    SCRAPE_TIMEOUT,
    HealthCache,
    Target,
    histogram_quantile,
    parse_samples,
    summarize,
)
from tests.support import free_port

INF = float("inf")


def exposition(acked: float, buckets: dict[str, float], depth: float = 3, paused: float = 0.0) -> str:
    lines = [
        "# TYPE iotnode_messages counter",
        f'iotnode_messages_total{{stage="acked"}} {acked}',
        f'iotnode_messages_total{{stage="stored"}} {acked / 2}',
        "# TYPE iotnode_ack_latency_seconds histogram",
    ]
    lines += [f'iotnode_ack_latency_seconds_bucket{{le="{le}"}} {n}' for le, n in buckets.items()]
    lines += [
        f"iotnode_ack_latency_seconds_count {list(buckets.values())[-1]}",
        "iotnode_ack_latency_seconds_sum 1.0",
        "# TYPE iotnode_ring_depth gauge",
        f'iotnode_ring_depth{{ring="ingress"}} {depth}',
        "# TYPE iotnode_ring_used_bytes gauge",
        'iotnode_ring_used_bytes{ring="ingress"} 1024',
        "# TYPE iotnode_ring_capacity_bytes gauge",
        'iotnode_ring_capacity_bytes{ring="ingress"} 4096',
        "# TYPE iotnode_backpressure_paused_seconds counter",
        f"iotnode_backpressure_paused_seconds_total {paused}",
        "# TYPE iotnode_fanout_slow_client_drops counter",
        "iotnode_fanout_slow_client_drops_total 2",
        "# TYPE iotnode_fanout_gap_client_drops counter",
        "iotnode_fanout_gap_client_drops_total 1",
        "",
    ]
    return "\n".join(lines)


def test_quantile_interpolates_within_the_bucket_like_prometheus() -> None:
    buckets = [(0.001, 0.0), (0.01, 50.0), (0.1, 100.0), (INF, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.01 + 0.09 * 49 / 50)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.001 + 0.009 * 0.5)
    assert histogram_quantile(0.99, [(0.1, 0.0), (INF, 0.0)]) is None
    assert histogram_quantile(0.99, [(0.1, 1.0), (INF, 10.0)]) == 0.1  # in +Inf: the largest bound


def test_rates_and_latency_come_from_the_deltas_between_two_scrapes() -> None:
    before = parse_samples(exposition(1000, {"0.001": 900, "0.01": 1000, "+Inf": 1000}, paused=10))
    after = parse_samples(exposition(1500, {"0.001": 900, "0.01": 1400, "+Inf": 1500}, paused=12))
    h = summarize(102.0, after, (100.0, before))
    assert h["interval_s"] == 2.0
    assert h["rates"]["acked"] == 250 and h["rates"]["stored"] == 125
    # of the 500 new acks 400 were in (1 ms, 10 ms], 100 above: the window's p99 is +Inf's bound
    assert h["ack_latency_ms"]["window"] == "interval" and h["ack_latency_ms"]["p99"] == pytest.approx(10.0)
    assert h["rings"]["ingress"] == {"depth": 3, "used_bytes": 1024, "capacity_bytes": 4096, "fill": 0.25}
    assert h["backpressure"]["paused_connections"] == 1.0
    assert h["closes_1013"] == {"total": 3, "per_s": 0.0}
    first = summarize(100.0, before)
    assert first["rates"]["acked"] is None and first["ack_latency_ms"]["window"] == "lifetime"
    assert first["ack_latency_ms"]["p50"] == pytest.approx(1.0 * 500 / 900)
    # a restarted process's counter goes down: no negative rate
    assert summarize(104.0, before, (102.0, after))["rates"]["acked"] == 0.0


class MetricsServer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        body = self.text.encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()


def test_one_scrape_per_second_is_shared_by_every_caller_and_dead_or_silent_targets_cost_a_timeout() -> None:
    async def run() -> None:
        good = MetricsServer(exposition(10, {"0.001": 5, "+Inf": 10}))
        server = await asyncio.start_server(good.handle, "127.0.0.1", 0)
        good_port = server.sockets[0].getsockname()[1]
        silent = socket.socket()  # accepts (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        dead_port = free_port()  # nothing listens
        now = [1000.0]
        cache = HealthCache(
            [
                Target("web", "127.0.0.1", good_port),
                Target("store", "127.0.0.1", silent.getsockname()[1]),
                Target("router", "127.0.0.1", dead_port),
            ],
            local=lambda: exposition(0, {"+Inf": 0}),
            clock=lambda: now[0],
        )
        try:
            started = time.monotonic()
            answers = await asyncio.gather(*(cache.get() for _ in range(20)))
            took = time.monotonic() - started
            assert cache.scrapes == 1 and good.requests == 1
            assert all(a is answers[0] for a in answers)
            assert took < SCRAPE_TIMEOUT + 0.4  # the silent target waited for once, in parallel
            processes = answers[0]["processes"]
            assert processes["web"]["up"] and processes["fanout"]["up"]
            assert processes["store"] == {
                "up": False,
                "scrape_ms": processes["store"]["scrape_ms"],
                "error": "timeout",
            }
            assert not processes["router"]["up"]
            assert answers[0]["rates"]["acked"] is None  # nothing to compare with yet
            now[0] += 0.5
            assert (await cache.get()) is answers[0] and good.requests == 1
            now[0] += 0.6
            good.text = exposition(30, {"0.001": 5, "+Inf": 30})
            later = await cache.get()
            assert cache.scrapes == 2 and good.requests == 2
            assert later["rates"]["acked"] == pytest.approx(20 / 1.1)
        finally:
            server.close()
            await server.wait_closed()
            silent.close()

    asyncio.run(run())
