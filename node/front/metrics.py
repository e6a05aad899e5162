"""Metrics of the web front: the uvicorn factory ``node.front.metrics:create_app``.

Each uvicorn worker builds the device front (:func:`node.front.app.create_app`) with two
metric seams plugged in:

* ``on_group`` (:meth:`FrontMetrics.on_group`, called once per group commit in the
  event loop): the ack latency of every message of the group, the group's size and
  its persist time go into plain local bucket arrays -- a ``bisect`` and an add per message, no lock
  and no shared-memory write.  prometheus_client's ``Histogram.observe`` in
  multiprocess mode costs a locked mmap write per call; it is not used per message.
* a flush, in the event loop every :data:`FLUSH_INTERVAL` seconds and just before
  a scrape answered by this worker, moves the local buckets into the histograms
  and the committer's ``FrontStats`` counts (deltas) into the counters.  A scrape
  therefore sees the other workers' counts at most one interval old.

``GET /metrics`` on ``NODE_WEB_PORT`` (any worker answers) merges every worker's
files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client multiprocess mode; the
Procfile sets and wipes the directory; ``python -m node.workers.web`` does the same
with ``NODE_DATA_DIR/metrics-web`` when the variable is unset).  Before merging, a worker whose pid no
longer runs (SIGKILLed, restarted by uvicorn) is marked dead with
``multiprocess.mark_process_dead`` so its ``livesum`` gauges (open connections,
pending bytes) stop counting; its counters stay (counters never go down).  Per-
process CPU and RSS of the live workers and of uvicorn's supervisor are read from
``/proc`` at scrape time (:mod:`node.procmetrics`).

Without ``PROMETHEUS_MULTIPROC_DIR`` (e.g. ``uvicorn --factory node.front.metrics:create_app``
run by hand) each worker serves its own default registry: exact with one worker,
per-worker with several.

``NODE_METRICS=off``: no ``on_group`` callback and no flush; ``/metrics`` shows the
processes' CPU/RSS only (for measuring the cost of the metrics, docs/metrics.md).
"""

from __future__ import annotations

import asyncio
import bisect
import glob
import logging
import os
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from node import health
from node.config import Settings, load_settings
from node.front import app as front
from node.front.committer import FrontStats
from node.metrics import (
    ACK_LATENCY,
    BACKPRESSURE_PAUSED_SECONDS,
    BACKPRESSURE_PAUSES,
    BATCH_RECORD_BUCKETS,
    DEVICE_CONNECTIONS,
    ERRORS,
    LATENCY_BUCKETS,
    MESSAGES,
    PERSIST_BATCH_RECORDS,
    PERSIST_BATCHES,
    PERSIST_BYTES,
    PERSIST_DURATION,
    PERSIST_SECONDS,
    RING_FULL,
    WEB_PENDING_BYTES,
    WEB_WORKERS,
    CachedExposition,
)
from node.procmetrics import ProcessStatsCollector, is_running, this_process

__all__ = ["FrontMetrics", "create_app", "render_metrics"]

FLUSH_INTERVAL = 1.0
#: A worker re-renders its merged /metrics at most this often: the counters of the other
#: workers are up to FLUSH_INTERVAL old anyway.
RENDER_TTL = 1.0
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger("iotnode.metrics")
_fallback_registered = False  # the single-registry fallback's CPU/RSS collector, once per process

_LIVE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db$")


class _LocalHistogram:
    """Bucket counts kept in a list, moved into a prometheus Histogram by :meth:`flush`.

    ``counts[i]`` holds observations ``<= bounds[i]`` and ``> bounds[i-1]`` (the last
    slot is ``+Inf``), the same non-cumulative layout the Histogram keeps per bucket.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def flush(self, histogram: Any) -> None:
        if not any(self.counts):
            return
        # Histogram has no batch observe: add each bucket's count once (one mmap write
        # per non-empty bucket per flush instead of two per message).
        buckets = histogram._buckets
        if len(buckets) != len(self.counts):
            raise RuntimeError(f"histogram has {len(buckets)} buckets, expected {len(self.counts)}")
        for i, n in enumerate(self.counts):
            if n:
                buckets[i].inc(n)
                self.counts[i] = 0
        histogram._sum.inc(self.sum)
        self.sum = 0.0


class FrontMetrics:
    """One per worker: observes group commits, flushes counts into the metric objects."""

    def __init__(self, stats: FrontStats) -> None:
        self.stats = stats
        self.latency = _LocalHistogram(LATENCY_BUCKETS)
        self.batch = _LocalHistogram(BATCH_RECORD_BUCKETS)
        self.persist = _LocalHistogram(LATENCY_BUCKETS)
        self._append_seen = 0.0  # FrontStats.append_seconds at the previous group
        self.persist_bytes = 0
        self._exported: dict[object, float] = {}

    def on_group(self, now: float, receive_times: Sequence[float], nbytes: int) -> None:
        """The committer's ``on_group`` seam: once per group, in the event loop."""
        latency = self.latency
        counts, bounds, where = latency.counts, latency.bounds, bisect.bisect_left
        total = 0.0
        for t in receive_times:
            d = now - t
            total += d
            counts[where(bounds, d)] += 1
        latency.sum += total
        n = len(receive_times)
        self.batch.counts[where(self.batch.bounds, n)] += 1
        self.batch.sum += n
        # The committer adds this group's append_batch time just before calling us.
        appended = self.stats.append_seconds
        took = appended - self._append_seen
        self._append_seen = appended
        self.persist.counts[where(self.persist.bounds, took)] += 1
        self.persist.sum += took
        self.persist_bytes += nbytes

    def _add(self, key: object, metric: Any, value: float) -> None:
        delta = value - self._exported.get(key, 0)
        if delta > 0:
            metric.inc(delta)
            self._exported[key] = value

    def flush(self) -> None:
        """Move everything counted since the last flush into the metric objects
        (in the event loop: ``FrontStats`` is only ever touched from there)."""
        st = self.stats
        self.latency.flush(ACK_LATENCY)
        self.batch.flush(PERSIST_BATCH_RECORDS)
        self.persist.flush(PERSIST_DURATION)
        if self.persist_bytes:
            PERSIST_BYTES.inc(self.persist_bytes)
            self.persist_bytes = 0
        self._add("received", MESSAGES.labels(stage="received"), st.received)
        self._add("acked", MESSAGES.labels(stage="acked"), st.acked)
        for kind, n in list(st.errors.items()):
            self._add(("error", kind), ERRORS.labels(stage="web", reason=kind), n)
        for status, n in list(st.refused.items()):
            self._add(("refused", status), ERRORS.labels(stage="web", reason=f"auth_{status}"), n)
        self._add("groups", PERSIST_BATCHES, st.groups)
        self._add("append_seconds", PERSIST_SECONDS, st.append_seconds)
        self._add("ring_full", RING_FULL, st.ring_full)
        self._add("paused", BACKPRESSURE_PAUSES, st.paused)
        self._add("paused_seconds", BACKPRESSURE_PAUSED_SECONDS, st.paused_seconds)
        DEVICE_CONNECTIONS.set(st.open_connections)
        WEB_PENDING_BYTES.set(st.pending_bytes)


# ---------------------------------------------------------------- the scrape
def _supervisor_pid() -> int | None:
    """uvicorn's parent process when this is one of its spawned workers."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except OSError:
        return None
    return ppid if b"node.workers.web" in cmdline and ppid != os.getpid() else None


def live_worker_pids(path: str) -> list[int]:
    """Pids with ``live*`` gauge files in ``path``; the ones no longer running are
    marked dead first (their files removed), so they are not returned."""
    pids: set[int] = set()
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        match = _LIVE_FILE.search(name)
        if match:
            pids.add(int(match.group(1)))
    alive = []
    for pid in sorted(pids):
        if is_running(pid):
            alive.append(pid)
        else:
            try:
                multiprocess.mark_process_dead(pid, path)
            except FileNotFoundError:
                pass  # another worker answering a scrape at the same time removed it first
    return alive


def render_metrics(path: str | None, supervisor: int | None) -> bytes:
    """The text exposition of the whole web front (or of this worker without ``path``)."""
    if path is None:
        return generate_latest(REGISTRY)
    workers = live_worker_pids(path)
    targets = [("web", pid) for pid in workers]
    if supervisor is not None:
        targets.append(("web-supervisor", supervisor))
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path)
    registry.register(ProcessStatsCollector(lambda: targets))
    return generate_latest(registry)


# ---------------------------------------------------------------- the factory
def create_app(settings: Settings | None = None) -> Starlette:
    """uvicorn factory (``node.front.metrics:create_app``): the device front with metrics."""
    settings = settings if settings is not None else load_settings()
    path = os.environ.get(MULTIPROC_ENV) or None
    supervisor = _supervisor_pid()
    global _fallback_registered
    if path is None and not _fallback_registered:
        REGISTRY.register(ProcessStatsCollector(this_process("web")))
        _fallback_registered = True
    WEB_WORKERS.set(1)
    metrics = FrontMetrics(FrontStats()) if settings.metrics else None
    # Merging every worker's files is the expensive part of a scrape: at most one render
    # per RENDER_TTL (or per 10 x its duration) in this worker, however often /metrics is asked.
    exposition = CachedExposition(lambda: render_metrics(path, supervisor), ttl=RENDER_TTL)

    async def endpoint(request: Request) -> Response:
        if metrics is not None:
            metrics.flush()
        body = await run_in_threadpool(exposition.get)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def web_ready() -> str | None:
        state = app.state.front
        if state.committer is None or state.ring is None or state.ring.closed:
            return "the ingress ring is not open yet"
        return None

    async def probe(request: Request) -> Response:
        status, text = health.answer(web_ready, request.url.path)
        return PlainTextResponse(text + "\n", status_code=status)

    app = front.create_app(
        settings,
        on_group=metrics.on_group if metrics is not None else None,
        routes=[
            Route("/metrics", endpoint),
            Route(health.HEALTH_PATH, probe),
            Route(health.READY_PATH, probe),
        ],
    )
    if metrics is not None:
        metrics.stats = app.state.front.stats
        _flush_periodically(app, metrics)
    return app


def _flush_periodically(app: Starlette, metrics: FrontMetrics) -> None:
    """Run :meth:`FrontMetrics.flush` every second while the app's lifespan runs."""
    inner = app.router.lifespan_context

    async def loop() -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                metrics.flush()
            except Exception:  # e.g. the multiprocess directory was removed: keep acking
                log.exception("metrics: flush failed")

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner(a) as state:
            task = asyncio.get_running_loop().create_task(loop(), name="iotnode-metrics-flush")
            try:
                yield state
            finally:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                metrics.flush()

    app.router.lifespan_context = lifespan
