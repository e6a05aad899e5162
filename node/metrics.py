"""Prometheus metrics of every process (contract 6).

Metric objects are defined once here; processes import what they use.  Single
process stages (monitor, router, publisher, store, fanout) serve the default
registry with :func:`serve`.  The ``web`` front runs several uvicorn workers and
uses prometheus_client's multiprocess mode: the Procfile sets and wipes
``PROMETHEUS_MULTIPROC_DIR`` before starting it (see ``node/workers/web.py``).

Every process also exports its CPU and RSS (``iotnode_process_*``, see
:mod:`node.procmetrics`); the web front's counters are fed from the committer's
``FrontStats`` by :mod:`node.webmetrics`.  Meanings and queries: docs/metrics.md.

Hot paths count in batches (``inc(n)`` once per batch), never per message under
a lock.  Ring gauges are computed at scrape time from the ring header.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from node.procmetrics import ProcessStatsCollector, this_process

# Buckets that resolve 100 µs .. 1 s (and a little beyond) for device ack latency.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)

MESSAGES = Counter(
    "iotnode_messages",
    "Messages handled, by stage: received, acked (web), forwarded (monitor), routed (router), "
    "published (publisher), stored (store), streamed (fanout)",
    ["stage"],
)
ERRORS = Counter("iotnode_errors", "Refused or failed inputs, by stage and reason", ["stage", "reason"])
ACK_LATENCY = Histogram(
    "iotnode_ack_latency_seconds", "Device message received -> ack sent", buckets=LATENCY_BUCKETS
)
STORE_COMMIT_SECONDS = Histogram(
    "iotnode_store_commit_seconds", "Store: one sink transaction (records + cursor), start to durable",
    buckets=LATENCY_BUCKETS,
)
STORE_LAG_SECONDS = Gauge(
    "iotnode_store_lag_seconds", "Store: commit time minus received_at of the newest record it committed"
)
STORE_GAPS = Counter("iotnode_store_gaps", "Store: gaps in the live stream recovered by FETCH from the publisher")
RING_DEPTH = Gauge("iotnode_ring_depth", "Records in the ring not yet consumed (popped)", ["ring"])
RING_BYTES_USED = Gauge("iotnode_ring_used_bytes", "Bytes of the ring holding un-popped records", ["ring"])
RING_CAPACITY = Gauge("iotnode_ring_capacity_bytes", "Data capacity of the ring", ["ring"])
RING_BACKEND = Gauge("iotnode_ring_backend_info", "Ring persistence backend (value 1)", ["ring", "backend"])

# web front (multiprocess mode: "livesum" gauges add the live workers' values and
# drop a dead worker's, see node.webmetrics; counters keep a dead worker's counts)
PERSIST_BATCHES = Counter(
    "iotnode_persist_batches", "Web: group commits (one append_batch + one persist) that appended records"
)
PERSIST_SECONDS = Counter(
    "iotnode_persist_seconds", "Web: time spent in append_batch calls, persist included (sum over groups)"
)
PERSIST_BYTES = Counter("iotnode_persist_bytes", "Web: record bytes appended to the ingress ring")
PERSIST_BATCH_RECORDS = Histogram(
    "iotnode_persist_batch_records",
    "Web: records per group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
)
PERSIST_DURATION = Histogram(
    "iotnode_persist_duration_seconds",
    "Web: one group commit, append_batch + persist (including waits for room in a full ring)",
    buckets=LATENCY_BUCKETS,
)
RING_FULL = Counter(
    "iotnode_ring_full", "Web: append_batch calls that found the ingress ring full (back-pressure)"
)
BACKPRESSURE_PAUSES = Counter(
    "iotnode_backpressure_pauses",
    "Web: times a device connection stopped reading until its window or the worker's pending bytes had room",
)
BACKPRESSURE_PAUSED_SECONDS = Counter(
    "iotnode_backpressure_paused_seconds", "Web: total time device connections spent paused (connection-seconds)"
)
DEVICE_CONNECTIONS = Gauge(
    "iotnode_device_connections", "Web: device WebSocket connections open", multiprocess_mode="livesum"
)
WEB_PENDING_BYTES = Gauge(
    "iotnode_web_pending_bytes", "Web: record bytes queued or persisting, not yet acked",
    multiprocess_mode="livesum",
)
WEB_WORKERS = Gauge(
    "iotnode_web_workers", "Web: live uvicorn worker processes (1 per worker)", multiprocess_mode="livesum"
)

# fanout (client-app stream)
FANOUT_CLIENTS = Gauge("iotnode_fanout_clients", "Client-app WebSocket connections open on the fanout")
FANOUT_SLOW_CLIENT_DROPS = Counter(
    "iotnode_fanout_slow_client_drops",
    "Client apps closed with 1013 because more than NODE_FANOUT_QUEUE messages waited for them",
)
FANOUT_DUPLICATES = Counter(
    "iotnode_fanout_duplicates", "Records not streamed: seq <= the last seq already streamed for the device"
)


def watch_ring(name: str, ring: object) -> None:
    """Export a ring's depth, bytes used, capacity and backend, read at scrape time."""
    RING_DEPTH.labels(ring=name).set_function(lambda: getattr(ring, "depth"))
    RING_BYTES_USED.labels(ring=name).set_function(lambda: getattr(ring, "bytes_used"))
    RING_CAPACITY.labels(ring=name).set(getattr(ring, "capacity"))
    RING_BACKEND.labels(ring=name, backend=getattr(ring, "backend")).set(1)


def register_process(name: str) -> None:
    """Export this single process's CPU and RSS as ``iotnode_process_*{process=name}``
    in the default registry (the web workers use :mod:`node.webmetrics` instead)."""
    global _process_registered
    if not _process_registered:
        REGISTRY.register(ProcessStatsCollector(this_process(name)))
        _process_registered = True


_process_registered = False


def serve(port: int, host: str) -> None:
    """Serve ``/metrics`` of this process's default registry on ``host:port`` (a daemon thread)."""
    start_http_server(port, addr=host)

