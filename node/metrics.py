"""Prometheus metrics of every process (contract 6).

Metric objects are defined once here; processes import what they use.  Single
process stages (monitor, router, publisher, store, fanout) serve the default
registry with :func:`serve`.  The ``web`` front runs several uvicorn workers and
uses prometheus_client's multiprocess mode: the Procfile sets and wipes
``PROMETHEUS_MULTIPROC_DIR`` before starting it (see ``node/workers/web.py``).

**A metric exists in a process only once that process uses it.**  The
definitions below are factories; ``from node.metrics import STORE_LAG_SECONDS``
(module ``__getattr__``, PEP 562) creates the metric on first use and caches it
in the module.  prometheus_client creates a label-less metric's value when the
metric is constructed -- in multiprocess mode that writes a file entry in every
process that constructed it -- so metrics built at import time here would put a
store gauge with ``{pid=...}`` into the web front's ``/metrics``, and the web's
counters at 0 into every stage's.  Instead each process exports only what it
owns (the stage modules import their own metrics; ``node.front.metrics`` the web's).

Every gauge names its ``multiprocess_mode`` (never the default ``all``, which
would add a ``pid`` label): the web's are ``livesum`` (a dead worker's value
drops out); the single-process stages' say how they would merge.

Every process also exports its CPU and RSS (``iotnode_process_*``, see
:mod:`node.procmetrics`); the web front's counters are fed from the committer's
``FrontStats`` by :mod:`node.front.metrics`.  Meanings and queries: docs/metrics.md.

Scrapes are cheap and bounded (issue 14): :func:`serve` answers from a
:class:`CachedExposition` (renders take at most ~1/:data:`COST_FACTOR` of a core
however often scrapers ask), with
at most :data:`MAX_SCRAPERS` handler threads (more: 503), a socket timeout and a
whole-request deadline; the web and fanout endpoints cache the same way.

Hot paths count in batches (``inc(n)`` once per batch), never per message under
a lock.  Ring gauges are computed at scrape time from the ring header.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

from node import health
from node.headroom import FillRate
from node.procmetrics import ProcessStatsCollector, this_process

# Buckets that resolve 100 µs .. 1 s (and a little beyond) for device ack latency.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
BATCH_RECORD_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

# ------------------------------------------------------------------ the metrics
# Declared (for readers and type checkers) here, built by _DEFINITIONS on first use.

# every stage (labelled: a process writes only the label values it uses)
MESSAGES: Counter
ERRORS: Counter
# rings (monitor: ingress, publisher: fan-in)
RING_DEPTH: Gauge
RING_BYTES_USED: Gauge
RING_CAPACITY: Gauge
RING_BACKEND: Gauge
RING_FILL_RATIO: Gauge
RING_HEADROOM_SECONDS: Gauge
# web front (multiprocess: counters and histograms summed over workers)
ACK_LATENCY: Histogram
PERSIST_BATCHES: Counter
PERSIST_SECONDS: Counter
PERSIST_BYTES: Counter
PERSIST_BATCH_RECORDS: Histogram
PERSIST_DURATION: Histogram
RING_FULL: Counter
BACKPRESSURE_PAUSES: Counter
BACKPRESSURE_PAUSED_SECONDS: Counter
DEVICE_CONNECTIONS: Gauge
WEB_PENDING_BYTES: Gauge
WEB_WORKERS: Gauge
# store
STORE_COMMIT_SECONDS: Histogram
STORE_LAG_SECONDS: Gauge
STORE_GAPS: Counter
# storage tier sinks (postgres, victoria, lake: label sink)
SINK_ROWS: Counter
SINK_LAG_RECORDS: Gauge
SINK_LAG_SECONDS: Gauge
SINK_WRITE_SECONDS: Histogram
SINK_UNKNOWN_DEVICES: Counter
SINK_SKIPPED_FIELDS: Counter
SINK_REGISTRY_DEVICES: Gauge
SINK_REGISTRY_RELOADS: Counter
# fanout (client-app stream)
FANOUT_CLIENTS: Gauge
FANOUT_SLOW_CLIENT_DROPS: Counter
FANOUT_DUPLICATES: Counter
FANOUT_GAPS: Counter
FANOUT_MISSED_MESSAGES: Counter
FANOUT_GAP_CLIENT_DROPS: Counter

_DEFINITIONS: dict[str, Callable[[], Any]] = {
    "MESSAGES": lambda: Counter(
        "iotnode_messages",
        "Messages handled, by stage: received, acked (web), forwarded (monitor), routed (router), "
        "published (publisher), stored (store), streamed (fanout)",
        ["stage"],
    ),
    "ERRORS": lambda: Counter(
        "iotnode_errors", "Refused or failed inputs, by stage and reason", ["stage", "reason"]
    ),
    # The ring gauges read one shared ring header: any reader reports the same value.
    "RING_DEPTH": lambda: Gauge(
        "iotnode_ring_depth",
        "Records in the ring not yet consumed (popped)",
        ["ring"],
        multiprocess_mode="livemax",
    ),
    "RING_BYTES_USED": lambda: Gauge(
        "iotnode_ring_used_bytes",
        "Bytes of the ring holding un-popped records",
        ["ring"],
        multiprocess_mode="livemax",
    ),
    "RING_CAPACITY": lambda: Gauge(
        "iotnode_ring_capacity_bytes", "Data capacity of the ring", ["ring"], multiprocess_mode="max"
    ),
    "RING_BACKEND": lambda: Gauge(
        "iotnode_ring_backend_info",
        "Ring persistence backend (value 1)",
        ["ring", "backend"],
        multiprocess_mode="max",
    ),
    "RING_FILL_RATIO": lambda: Gauge(
        "iotnode_ring_fill_ratio",
        "Bytes of the ring holding un-popped records / its capacity (1: full, the stage in front pushes"
        " back)",
        ["ring"],
        multiprocess_mode="livemax",
    ),
    "RING_HEADROOM_SECONDS": lambda: Gauge(
        "iotnode_ring_headroom_seconds",
        "Seconds of ingest the ring still takes at the current append rate if its consumer stopped now "
        "(free bytes / append rate between scrapes; +Inf when nothing is appended)",
        ["ring"],
        multiprocess_mode="livemin",
    ),
    "ACK_LATENCY": lambda: Histogram(
        "iotnode_ack_latency_seconds", "Device message received -> ack sent", buckets=LATENCY_BUCKETS
    ),
    "PERSIST_BATCHES": lambda: Counter(
        "iotnode_persist_batches",
        "Web: group commits (one append_batch + one persist) that appended records",
    ),
    "PERSIST_SECONDS": lambda: Counter(
        "iotnode_persist_seconds", "Web: time spent in append_batch calls, persist included (sum over groups)"
    ),
    "PERSIST_BYTES": lambda: Counter(
        "iotnode_persist_bytes", "Web: record bytes appended to the ingress ring"
    ),
    "PERSIST_BATCH_RECORDS": lambda: Histogram(
        "iotnode_persist_batch_records", "Web: records per group commit", buckets=BATCH_RECORD_BUCKETS
    ),
    "PERSIST_DURATION": lambda: Histogram(
        "iotnode_persist_duration_seconds",
        "Web: one group commit, append_batch + persist (including waits for room in a full ring)",
        buckets=LATENCY_BUCKETS,
    ),
    "RING_FULL": lambda: Counter(
        "iotnode_ring_full", "Web: append_batch calls that found the ingress ring full (back-pressure)"
    ),
    "BACKPRESSURE_PAUSES": lambda: Counter(
        "iotnode_backpressure_pauses",
        "Web: times a device connection stopped reading until its window or the worker's pending bytes had "
        "room",
    ),
    "BACKPRESSURE_PAUSED_SECONDS": lambda: Counter(
        "iotnode_backpressure_paused_seconds",
        "Web: total time device connections spent paused (connection-seconds)",
    ),
    # "livesum": add the live workers' values, drop a dead worker's (node.front.metrics)
    "DEVICE_CONNECTIONS": lambda: Gauge(
        "iotnode_device_connections", "Web: device WebSocket connections open", multiprocess_mode="livesum"
    ),
    "WEB_PENDING_BYTES": lambda: Gauge(
        "iotnode_web_pending_bytes",
        "Web: record bytes queued or persisting, not yet acked",
        multiprocess_mode="livesum",
    ),
    "WEB_WORKERS": lambda: Gauge(
        "iotnode_web_workers",
        "Web: live uvicorn worker processes (1 per worker)",
        multiprocess_mode="livesum",
    ),
    "STORE_COMMIT_SECONDS": lambda: Histogram(
        "iotnode_store_commit_seconds",
        "Store: one sink transaction (records + cursor), start to durable",
        buckets=LATENCY_BUCKETS,
    ),
    "STORE_LAG_SECONDS": lambda: Gauge(
        "iotnode_store_lag_seconds",
        "Store: commit time minus received_at of the newest record it committed",
        multiprocess_mode="mostrecent",
    ),
    "STORE_GAPS": lambda: Counter(
        "iotnode_store_gaps", "Store: fan-in records released before the store had them (see the store's log)"
    ),
    "SINK_ROWS": lambda: Counter(
        "iotnode_sink_rows", "Storage sink: rows made durable in the destination", ["sink"]
    ),
    "SINK_LAG_RECORDS": lambda: Gauge(
        "iotnode_sink_lag_records",
        "Storage sink: rows in the SQLite store not yet durable in the destination",
        ["sink"],
        multiprocess_mode="mostrecent",
    ),
    "SINK_LAG_SECONDS": lambda: Gauge(
        "iotnode_sink_lag_seconds",
        "Storage sink: now minus received_at of the oldest row not yet durable in the destination"
        " (0: caught up)",
        ["sink"],
        multiprocess_mode="mostrecent",
    ),
    "SINK_WRITE_SECONDS": lambda: Histogram(
        "iotnode_sink_write_seconds",
        "Storage sink: one durable write (rows + cursor) to the destination",
        ["sink"],
        buckets=LATENCY_BUCKETS,
    ),
    "SINK_UNKNOWN_DEVICES": lambda: Counter(
        "iotnode_sink_unknown_device_records",
        "Storage sink: rows of devices missing from the device registry (stored with type=unknown)",
        ["sink"],
    ),
    "SINK_SKIPPED_FIELDS": lambda: Counter(
        "iotnode_sink_skipped_fields",
        "Storage sink: data fields not written because the destination takes numbers only (victoria)",
        ["sink"],
    ),
    "SINK_REGISTRY_DEVICES": lambda: Gauge(
        "iotnode_sink_registry_devices",
        "Storage sink: devices in the active device registry",
        ["sink"],
        multiprocess_mode="mostrecent",
    ),
    "SINK_REGISTRY_RELOADS": lambda: Counter(
        "iotnode_sink_registry_reloads",
        "Storage sink: device registry files read, by result (loaded, refused)",
        ["sink", "result"],
    ),
    "FANOUT_CLIENTS": lambda: Gauge(
        "iotnode_fanout_clients",
        "Client-app WebSocket connections open on the fanout",
        multiprocess_mode="livesum",
    ),
    "FANOUT_SLOW_CLIENT_DROPS": lambda: Counter(
        "iotnode_fanout_slow_client_drops",
        "Client apps closed with 1013 because more than NODE_FANOUT_QUEUE messages waited for them",
    ),
    "FANOUT_GAPS": lambda: Counter(
        "iotnode_fanout_gaps",
        "Gaps in a device's live stream (messages the PUB/SUB high-water mark dropped); its followers are "
        "closed with 1013",
    ),
    "FANOUT_MISSED_MESSAGES": lambda: Counter(
        "iotnode_fanout_missed_messages",
        "Live messages the fanout never received (the sum of the gaps' sizes)",
    ),
    "FANOUT_GAP_CLIENT_DROPS": lambda: Counter(
        "iotnode_fanout_gap_client_drops",
        "Client apps closed with 1013 because the live stream of a device they follow had a gap",
    ),
    "FANOUT_DUPLICATES": lambda: Counter(
        "iotnode_fanout_duplicates",
        "Records not streamed: seq <= the last seq already streamed for the device",
    ),
}

_create_lock = threading.Lock()


def _metric(name: str) -> Any:
    """The metric ``name``, created the first time this process uses it."""
    define = _DEFINITIONS.get(name)
    if define is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _create_lock:
        metric = globals().get(name)
        if metric is None:
            metric = define()
            globals()[name] = metric
    return metric


def __getattr__(name: str) -> Any:  # PEP 562: ``node.metrics.X`` and ``from node.metrics import X``
    return _metric(name)


def watch_ring(name: str, ring: object) -> None:
    """Export a ring's depth, bytes used, capacity, backend, fill ratio and headroom, read at scrape
    time (the headroom's append rate from the tail's growth between scrapes: node.headroom)."""
    _metric("RING_DEPTH").labels(ring=name).set_function(lambda: ring.depth)
    _metric("RING_BYTES_USED").labels(ring=name).set_function(lambda: ring.bytes_used)
    _metric("RING_CAPACITY").labels(ring=name).set(ring.capacity)
    _metric("RING_BACKEND").labels(ring=name, backend=ring.backend).set(1)
    capacity = ring.capacity
    _metric("RING_FILL_RATIO").labels(ring=name).set_function(lambda: ring.bytes_used / capacity)
    rate = FillRate()
    rate.observe(time.monotonic(), ring.tail)  # the first scrape already has a rate

    def headroom() -> float:
        return rate.headroom(time.monotonic(), ring.tail, capacity, ring.bytes_used)

    _metric("RING_HEADROOM_SECONDS").labels(ring=name).set_function(headroom)


def register_process(name: str) -> None:
    """Export this single process's CPU and RSS as ``iotnode_process_*{process=name}``
    in the default registry (the web workers use :mod:`node.front.metrics` instead)."""
    global _process_registered
    if not _process_registered:
        REGISTRY.register(ProcessStatsCollector(this_process(name)))
        _process_registered = True


_process_registered = False


#: A scrape within COST_FACTOR x (the last render's duration) of that render gets its
#: text again: a scrape storm spends at most ~1/(1 + COST_FACTOR) of a core rendering.
COST_FACTOR = 10.0
#: Concurrent scrape handlers of a stage's /metrics server; more connections get 503.
MAX_SCRAPERS = 4
#: Socket timeout of a scrape connection, and its whole-request deadline (seconds).
SCRAPE_TIMEOUT = 5.0


class CachedExposition:
    """Renders the exposition text for scrapes, at a bounded CPU cost (thread-safe).

    A call within ``max(ttl, COST_FACTOR x duration of the last render)`` seconds of
    the last render returns that render's text; concurrent callers wait for one
    render and share it.  So scrapers cannot make a process spend more than about
    1/(1 + COST_FACTOR) of a core on renders, however often they ask, and a cheap
    render stays fresh (a 1 ms render is reused for 10 ms)."""

    def __init__(self, render: Callable[[], bytes], ttl: float = 0.0) -> None:
        self._render = render
        self._ttl = ttl
        self._lock = threading.Lock()
        self._body = b""
        self._at = float("-inf")
        self._reuse_for = ttl

    def get(self) -> bytes:
        with self._lock:
            if time.monotonic() - self._at >= self._reuse_for:
                started = time.monotonic()
                self._body = self._render()
                self._at = time.monotonic()
                self._reuse_for = max(self._ttl, COST_FACTOR * (self._at - started))
            return self._body


_BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def serve(port: int, host: str) -> ThreadingHTTPServer:
    """Serve ``/metrics`` of this process's default registry on ``host:port`` (a daemon thread),
    with ``/healthz`` and ``/readyz`` (:mod:`node.health`) beside it.

    Bounded: at most :data:`MAX_SCRAPERS` connections are handled at once (others get
    503 and are closed), each for at most 2 x :data:`SCRAPE_TIMEOUT` seconds, and
    renders are rate-limited by :class:`CachedExposition`."""
    cache = CachedExposition(lambda: generate_latest(REGISTRY))
    slots = threading.BoundedSemaphore(MAX_SCRAPERS)

    class Handler(BaseHTTPRequestHandler):
        timeout = SCRAPE_TIMEOUT  # every socket operation
        protocol_version = "HTTP/1.0"  # one request per connection

        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            probe = health.probe(path)  # /healthz, /readyz (node/health.py)
            if probe is not None:
                status, text = probe
                self._answer(status, "text/plain; charset=utf-8", (text + "\n").encode())
                return
            if path not in ("/metrics", "/"):
                self.send_error(404)
                return
            self._answer(200, CONTENT_TYPE_LATEST, cache.get())

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None  # scrapes are not worth a log line each

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 64
        closing = False

        def process_request(self, request: Any, client_address: Any) -> None:
            if not slots.acquire(blocking=False):
                try:
                    request.settimeout(0.5)
                    request.sendall(_BUSY)
                except OSError:
                    pass
                self.shutdown_request(request)
                return
            super().process_request(request, client_address)

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            # The whole request, however it trickles, ends within SCRAPE_TIMEOUT x 2.
            watchdog = threading.Timer(2 * SCRAPE_TIMEOUT, _abort, (request,))
            watchdog.daemon = True
            watchdog.start()
            try:
                super().process_request_thread(request, client_address)
            finally:
                watchdog.cancel()
                slots.release()

        def serve_until_closed(self) -> None:
            """``serve_forever`` without its 0.5 s poll (an idle stage's most frequent wake-up):
            each ``handle_request`` blocks until a connection comes; :meth:`close` ends it."""
            while not self.closing:
                self.handle_request()

        def close(self) -> None:
            """Stop serving (from another thread): the listening socket's read side is
            shut down, which wakes the blocked ``handle_request``."""
            self.closing = True
            try:
                self.socket.shutdown(socket.SHUT_RD)
            except OSError:
                pass

        def shutdown(self) -> None:
            self.close()  # serve_forever (which BaseServer.shutdown waits for) never runs

    Server.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = Server((host, port), Handler)
    threading.Thread(target=server.serve_until_closed, name="iotnode-metrics", daemon=True).start()
    return server


def _abort(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
