"""Node health for the dashboard: the processes' own ``/metrics``, scraped at most once a second.

::

    HealthCache(targets, local).get() -> dict               (JSON-ready, see summarize)
        one scrape of every target per HEALTH_INTERVAL at most, shared by every
        caller: callers arriving while a scrape runs wait for it; each target has
        a SCRAPE_TIMEOUT, a dead one shows as ``up: false`` and costs no more.
        Rates span the scrapes of the last RATE_WINDOW seconds.
    summarize(now, samples, previous) -> dict               free of I/O
        rates from counter deltas between two scrapes (server side), ack latency
        quantiles from the histogram's bucket deltas, ring depth and fill, store
        lag, back-pressure, connections, 1013 closes, CPU per process.

Metric names are the contract's and docs/metrics.md's: ``iotnode_messages_total{stage}``,
``iotnode_ack_latency_seconds_bucket{le}``, ``iotnode_ring_depth{ring}``, ...
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client.parser import text_string_to_metric_families

HEALTH_INTERVAL: Final = 1.0  # seconds: at most one scrape of the node per interval
SCRAPE_TIMEOUT: Final = 0.5  # seconds per target (connect + answer)
MAX_SCRAPE_BYTES: Final = 4 << 20  # a /metrics answer larger than this is cut off (counted as down)
RATE_MAX_INTERVAL: Final = 30.0  # seconds: an older previous scrape gives no rates
# Rates span about this many seconds of kept scrapes: the web workers copy their
# counts into the shared files once a second each, so one-second deltas jitter.
RATE_WINDOW: Final = 5.0

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


@dataclass(frozen=True)
class Target:
    """One process's ``/metrics``: Procfile name, host, port."""

    name: str
    host: str
    port: int


def parse_samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


def _sum(samples: Samples, name: str, **labels: str) -> float | None:
    want = set(labels.items())
    values = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    return sum(values) if values else None


def _buckets(samples: Samples, name: str) -> list[tuple[float, float]]:
    """``(le, cumulative count)`` of a histogram, summed over its other labels, by ``le``."""
    out: dict[float, float] = {}
    for (n, ls), v in samples.items():
        if n == name + "_bucket":
            le = float(dict(ls).get("le", "inf"))
            out[le] = out.get(le, 0.0) + v
    return sorted(out.items())


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear within the bucket holding rank ``q``.

    ``buckets`` are cumulative ``(upper bound, count)`` pairs ending with ``+Inf``.
    ``None`` without observations; a rank in the ``+Inf`` bucket gives the largest
    finite bound.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank and count > below:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = (upper if not math.isinf(upper) else lower), count
    return lower


def _delta_buckets(
    now: list[tuple[float, float]], before: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    old = dict(before)
    return [(le, max(0.0, c - old.get(le, 0.0))) for le, c in now]


def _rate(now: float | None, before: float | None, dt: float | None) -> float | None:
    if now is None or before is None or not dt:
        return None
    return max(0.0, now - before) / dt  # a restarted process's counter went down: no negative rate


def summarize(now: float, samples: Samples, previous: tuple[float, Samples] | None = None) -> dict[str, Any]:
    """The dashboard's health numbers from one merged scrape (and the one before)."""
    dt: float | None = None
    before: Samples = {}
    if previous is not None and 0 < now - previous[0] <= RATE_MAX_INTERVAL:
        dt, before = now - previous[0], previous[1]

    def rate(name: str, **labels: str) -> float | None:
        return _rate(_sum(samples, name, **labels), _sum(before, name, **labels), dt)

    stages = ("received", "acked", "forwarded", "routed", "published", "stored", "streamed")
    ack_buckets = _buckets(samples, "iotnode_ack_latency_seconds")
    window = _delta_buckets(ack_buckets, _buckets(before, "iotnode_ack_latency_seconds")) if dt else []
    # Latency over the last interval; with nothing acked in it, over the process's life.
    use = window if window and window[-1][1] > 0 else ack_buckets

    def ms(q: float) -> float | None:
        value = histogram_quantile(q, use)
        return None if value is None else value * 1000.0

    rings: dict[str, dict[str, float | None]] = {}
    for ring in ("ingress", "fanin"):
        used = _sum(samples, "iotnode_ring_used_bytes", ring=ring)
        capacity = _sum(samples, "iotnode_ring_capacity_bytes", ring=ring)
        rings[ring] = {
            "depth": _sum(samples, "iotnode_ring_depth", ring=ring),
            "used_bytes": used,
            "capacity_bytes": capacity,
            "fill": (used / capacity) if used is not None and capacity else None,
        }
    slow = _sum(samples, "iotnode_fanout_slow_client_drops_total")
    gap = _sum(samples, "iotnode_fanout_gap_client_drops_total")
    closes = None if slow is None and gap is None else (slow or 0.0) + (gap or 0.0)
    slow_rate, gap_rate = (
        rate("iotnode_fanout_slow_client_drops_total"),
        rate("iotnode_fanout_gap_client_drops_total"),
    )
    cpu: dict[str, float] = {}
    if dt:
        for (n, ls), v in samples.items():
            if n == "iotnode_process_cpu_seconds_total":
                process = dict(ls).get("process", "?")
                old = before.get((n, ls))
                if old is not None:  # a pid that just appeared has no delta yet
                    cpu[process] = cpu.get(process, 0.0) + max(0.0, v - old) / dt
    return {
        "interval_s": dt,
        "rates": {stage: rate("iotnode_messages_total", stage=stage) for stage in stages},
        "totals": {stage: _sum(samples, "iotnode_messages_total", stage=stage) for stage in stages},
        "ack_latency_ms": {
            "p50": ms(0.5),
            "p99": ms(0.99),
            "window": "interval" if use is window else "lifetime",
        },
        "rings": rings,
        "store_lag_s": _sum(samples, "iotnode_store_lag_seconds"),
        "backpressure": {
            # rate of the paused-seconds counter = connections paused on average
            "paused_connections": rate("iotnode_backpressure_paused_seconds_total"),
            "pauses_per_s": rate("iotnode_backpressure_pauses_total"),
            "ring_full_per_s": rate("iotnode_ring_full_total"),
        },
        "device_connections": _sum(samples, "iotnode_device_connections"),
        "fanout_clients": _sum(samples, "iotnode_fanout_clients"),
        "closes_1013": {
            "total": closes,
            "per_s": None
            if slow_rate is None and gap_rate is None
            else (slow_rate or 0.0) + (gap_rate or 0.0),
        },
        "errors_per_s": rate("iotnode_errors_total"),
        "cpu_cores": {k: round(v, 4) for k, v in sorted(cpu.items())},
    }


async def fetch_metrics(target: Target, timeout: float = SCRAPE_TIMEOUT) -> str:
    """``GET /metrics`` over plain HTTP/1.0 (no client library: one small request a second)."""

    async def get() -> str:
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            writer.write(f"GET /metrics HTTP/1.0\r\nHost: {target.host}:{target.port}\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read(MAX_SCRAPE_BYTES + 1)
            while data and len(data) <= MAX_SCRAPE_BYTES and not reader.at_eof():
                more = await reader.read(MAX_SCRAPE_BYTES + 1 - len(data))
                if not more:
                    break
                data += more
        finally:
            writer.close()
        if len(data) > MAX_SCRAPE_BYTES:
            raise OSError(f"answer over {MAX_SCRAPE_BYTES} bytes")
        head, sep, body = data.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].split()
        if not sep or len(status) < 2 or status[1] != b"200":
            raise OSError(f"answered {head[:40]!r}")
        return body.decode("utf-8", errors="replace")

    return await asyncio.wait_for(get(), timeout)


class HealthCache:
    """One scrape of every target per :data:`HEALTH_INTERVAL` at most, shared by all callers."""

    def __init__(
        self,
        targets: Iterable[Target],
        local: Callable[[], str] | None = None,
        local_name: str = "fanout",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.targets = list(targets)
        self.local = local  # this process's own exposition, read without a request
        self.local_name = local_name
        self.clock = clock
        self.scrapes = 0  # how many times the node was scraped (tests, the cost bench)
        self._at = -math.inf
        self._value: dict[str, Any] | None = None
        self._history: collections.deque[tuple[float, Samples]] = collections.deque(maxlen=16)
        self._running: asyncio.Future[dict[str, Any]] | None = None

    async def get(self) -> dict[str, Any]:
        if self._value is not None and self.clock() - self._at < HEALTH_INTERVAL:
            return self._value
        if self._running is None:
            self._running = asyncio.ensure_future(self._refresh())
        running = self._running
        try:
            return await asyncio.shield(running)  # a caller that goes away does not cancel the scrape
        finally:
            if running.done() and self._running is running:
                self._running = None

    def _baseline(self, now: float) -> tuple[float, Samples] | None:
        """The oldest kept scrape at most :data:`RATE_WINDOW` (+ a scrape's slack) old, else the newest."""
        for at, samples in self._history:
            if now - at <= RATE_WINDOW + 0.5 * HEALTH_INTERVAL:
                return at, samples
        return self._history[-1] if self._history else None

    async def _scrape(self, target: Target) -> tuple[str, str | None, float, str | None]:
        start = time.perf_counter()
        try:
            text = await fetch_metrics(target)
            return target.name, text, time.perf_counter() - start, None
        except (TimeoutError, OSError, UnicodeError) as exc:
            why = "timeout" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
            return target.name, None, time.perf_counter() - start, why

    async def _refresh(self) -> dict[str, Any]:
        results = await asyncio.gather(*(self._scrape(t) for t in self.targets))
        now = self.clock()
        merged: Samples = {}
        processes: dict[str, dict[str, Any]] = {}
        texts: list[tuple[str, str]] = [(name, text) for name, text, _, _ in results if text is not None]
        if self.local is not None:
            texts.append((self.local_name, self.local()))
            processes[self.local_name] = {"up": True, "scrape_ms": 0.0}
        for name, text, seconds, why in results:
            processes[name] = {"up": text is not None, "scrape_ms": round(seconds * 1000, 1)}
            if why is not None:
                processes[name]["error"] = why
        for name, text in texts:
            try:
                samples = parse_samples(text)
            except ValueError:
                processes[name] = {"up": False, "error": "unparsable /metrics"}
                continue
            for key, value in samples.items():
                if key[0].startswith("iotnode_"):
                    merged[key] = merged.get(key, 0.0) + value
        summary = summarize(now, merged, self._baseline(now))
        self._history.append((now, merged))
        summary["time"] = time.time()
        summary["processes"] = processes
        self.scrapes += 1
        self._value, self._at = summary, now
        return summary


def targets_of(settings: Any) -> list[Target]:
    """The other processes' metrics endpoints of this node (the fanout reads its own registry)."""
    host = settings.host
    if host in ("0.0.0.0", "", "*"):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "::1"
    ports: Mapping[str, int] = {
        "web": settings.web_port,
        "monitor": settings.metrics_port_monitor,
        "router": settings.metrics_port_router,
        "publisher": settings.metrics_port_publisher,
        "store": settings.metrics_port_store,
    }
    return [Target(name, host, port) for name, port in ports.items()]
