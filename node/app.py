"""The device front: a Starlette app serving ``/v1/ingest`` (contract 3).

A thin adapter: the handshake is checked with :mod:`node.auth` *before* the
upgrade (refusal = an HTTP 401/403 response through the WebSocket Denial Response
ASGI extension, no upgrade); each frame goes through :func:`node.protocol.parse_frame`;
accepted messages are packed into the ring envelope and handed to the worker's
:class:`node.committer.Committer`, which acks after the persist.

Per connection there are two coroutines: the *reader* (this endpoint) waits for
window room, reads a frame, and parses it; the *writer* sends what the committer
and the parser left for the device (error replies and the coalesced ack), so a
device that does not read its acks never blocks the committer or other devices.

``create_app(settings=None, *, on_group=None, routes=(), commit_mode="auto", metrics=True)``
builds the app; uvicorn calls it as a factory in each worker process
(``node.app:create_app``), and the lifespan opens the ring *in the worker*, after
the fork/spawn.  ``/metrics`` (contract 6) is served by :class:`WebMetrics` over
the ``node.metrics`` definitions; ``on_group`` and ``routes`` are further seams.
``app.state.front`` holds the worker's :class:`FrontState` (committer, stats, ring).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from node.auth import load_secret, token_from_request, verify_device_token
from node.committer import Committer, Conn, FrontStats, GroupCallback
from node.config import Settings, load_settings
from node.errors import AuthError
from node.gcpolicy import GcPolicy
from node.protocol import ErrorReply, parse_frame, reject
from node.record import pack_record

__all__ = ["FrontState", "WebMetrics", "create_app", "raise_nofile_limit"]

log = logging.getLogger("iotnode.front")

INGEST_PATH = "/v1/ingest"
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TOO_BIG = 1009


@dataclass
class FrontState:
    settings: Settings
    secret: str
    stats: FrontStats
    ring: Any = None  # node.ring.Ring once started
    committer: Committer | None = None
    gc: GcPolicy | None = None  # the worker's GC policy once started


class RedactTokens(logging.Filter):
    """Keep JWTs out of the logs: uvicorn logs the request path *with its query
    string* (``?token=...``) at INFO when it accepts a WebSocket.  Installed on the
    ``uvicorn.error`` logger by :func:`create_app` (so in every worker).

    Also drops uvicorn's (0.54, websockets-sansio) spurious ERROR "ASGI callable
    returned without completing handshake." that follows every *denial response*:
    that implementation never marks a denied handshake complete.  Our endpoint
    returns before accepting only after sending a denial, so the line carries no
    information, and a flood of bad tokens would otherwise flood the log."""

    _pattern = re.compile(r"(?i)(token=)[^&\s\"']+")
    _spurious = "ASGI callable returned without completing handshake."

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == self._spurious:
            return False
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(
                self._pattern.sub(r"\1<redacted>", arg) if isinstance(arg, str) else arg for arg in record.args
            )
        elif isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = self._pattern.sub(r"\1<redacted>", record.msg)
        return True


def _install_logging(level: str) -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, RedactTokens) for f in logger.filters):
        logger.addFilter(RedactTokens())
    # Our own loggers ("iotnode.*", "node.ring") print like uvicorn's, at NODE_LOG_LEVEL.
    for name in ("iotnode", "node"):
        ours = logging.getLogger(name)
        ours.setLevel(level.upper())
        if not ours.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)-9s %(name)s: %(message)s"))
            ours.addHandler(handler)
            ours.propagate = False


class WebMetrics:
    """Contract 6 for the web workers: ``/metrics`` on NODE_WEB_PORT, summed over
    the workers with prometheus_client's multiprocess mode (the Procfile sets and
    wipes ``PROMETHEUS_MULTIPROC_DIR``; without it each worker reports only itself).

    Batched: ack latencies are observed per persisted group (``on_group``), and the
    worker's counts (:class:`FrontStats`) are copied into the counters as deltas
    once a second and before each scrape -- never a metric call per frame.
    ``iotnode_messages_total{stage="received"|"acked"}``,
    ``iotnode_errors_total{stage="web", reason=<protocol kind> | "auth_401" | "auth_403"}``,
    ``iotnode_ack_latency_seconds``.  The ingress ring depth is exported by the
    monitor (its consumer), not by every web worker.
    """

    SYNC_EVERY = 1.0

    def __init__(self, stats: FrontStats) -> None:
        from node import metrics

        self._metrics = metrics
        self._stats = stats
        self._received = metrics.MESSAGES.labels(stage="received")
        self._acked = metrics.MESSAGES.labels(stage="acked")
        self._observe = metrics.ACK_LATENCY.observe
        self._seen_received = 0
        self._seen_errors: dict[str, int] = {}
        self._seen_refused: dict[int, int] = {}

    def on_group(self, now: float, receive_times: Sequence[float], nbytes: int) -> None:
        observe = self._observe
        for t in receive_times:
            observe(now - t)
        self._acked.inc(len(receive_times))

    def sync(self) -> None:
        stats = self._stats
        if stats.received > self._seen_received:
            self._received.inc(stats.received - self._seen_received)
            self._seen_received = stats.received
        errors = self._metrics.ERRORS
        for kind, count in list(stats.errors.items()):
            delta = count - self._seen_errors.get(kind, 0)
            if delta:
                errors.labels(stage="web", reason=kind).inc(delta)
                self._seen_errors[kind] = count
        for status, count in list(stats.refused.items()):
            delta = count - self._seen_refused.get(status, 0)
            if delta:
                errors.labels(stage="web", reason=f"auth_{status}").inc(delta)
                self._seen_refused[status] = count

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.SYNC_EVERY)
            self.sync()

    def route(self) -> Route:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
        from prometheus_client import multiprocess

        async def endpoint(request: Request) -> Response:
            self.sync()
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                registry = CollectorRegistry()
                multiprocess.MultiProcessCollector(registry)
            else:
                registry = REGISTRY
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

        return Route("/metrics", endpoint)


def raise_nofile_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def pending_bytes_limit(settings: Settings, ring_capacity: int) -> int:
    """How many record bytes one worker may hold queued or persisting."""
    return max(4 * settings.max_message_bytes, min(16 << 20, ring_capacity // 4))


def _open_ring(settings: Settings) -> Any:
    from node.ring import Ring

    settings.data_path.mkdir(parents=True, exist_ok=True)
    return Ring.open(
        settings.ring_path("ingress"), capacity=settings.ingress_ring_bytes, durability=settings.durability
    )


def create_app(
    settings: Settings | None = None,
    *,
    on_group: GroupCallback | None = None,
    routes: Sequence[BaseRoute] = (),
    commit_mode: str = "auto",
    metrics: bool = True,
) -> Starlette:
    """Build the front.  ``commit_mode``: ``"auto"`` (inline on a pmem ring or with
    durability "process", else the commit thread), ``"thread"`` or ``"inline"``
    (for measurements).  ``metrics``: serve this module's minimal ``/metrics`` (see
    :class:`WebMetrics`); ``node.webmetrics`` passes False and plugs in its own."""
    if commit_mode not in ("auto", "thread", "inline"):
        raise ValueError(f"commit_mode must be auto, thread or inline, got {commit_mode!r}")
    settings = settings if settings is not None else load_settings()
    _install_logging(settings.log_level)
    state = FrontState(settings=settings, secret=load_secret(settings), stats=FrontStats())
    web_metrics = WebMetrics(state.stats) if metrics else None
    hooks = [h for h in (web_metrics.on_group if web_metrics else None, on_group) if h is not None]
    group_hook: GroupCallback | None
    if len(hooks) == 2:
        first, second = hooks

        def group_hook(now: float, receive_times: Sequence[float], nbytes: int) -> None:
            first(now, receive_times, nbytes)
            second(now, receive_times, nbytes)
    else:
        group_hook = hooks[0] if hooks else None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise_nofile_limit()
        ring = _open_ring(settings)
        # A thread hop costs ~45 us (measured: tests/front/measure_persist.py).  msync
        # blocks 0.2-4 ms: run it in the commit thread while the loop keeps reading.
        # libpmem on real pmem (cache-line flushes) and durability "process" (no
        # persist, ~2 us per call) are cheaper inline.  See docs/front.md.
        if commit_mode == "auto":
            threaded = ring.backend != "pmem" and settings.durability == "power"
        else:
            threaded = commit_mode == "thread"
        committer = Committer(
            ring,
            max_pending_bytes=pending_bytes_limit(settings, ring.capacity),
            window=settings.conn_window,
            threaded=threaded,
            on_group=group_hook,
            stats=state.stats,
        )
        await committer.start()
        state.ring, state.committer = ring, committer
        log.info(
            "ingress ring %s (backend %s, %s commit), window %d",
            settings.ring_path("ingress"),
            ring.backend,
            "threaded" if threaded else "inline",
            settings.conn_window,
        )
        sync_task = asyncio.get_running_loop().create_task(web_metrics.run()) if web_metrics else None
        # Start-up objects and accepted connections are frozen, no automatic full
        # collection (they paused the loop 0.5-4 s at 10k connections): node/gcpolicy.py.
        gc_policy = GcPolicy()
        gc_policy.start()
        gc_task = asyncio.get_running_loop().create_task(gc_policy.run(), name="iotnode-gc")
        state.gc = gc_policy
        try:
            yield
        finally:
            gc_task.cancel()
            if sync_task is not None:
                sync_task.cancel()
            await committer.stop()
            if web_metrics is not None:
                web_metrics.sync()
            ring.close()
            gc_policy.restore()

    async def ingest(websocket: WebSocket) -> None:
        await _serve_device(websocket, state)

    extra = [web_metrics.route()] if web_metrics else []
    app = Starlette(routes=[WebSocketRoute(INGEST_PATH, ingest), *extra, *routes], lifespan=lifespan)
    app.state.front = state
    return app


async def _deny(websocket: WebSocket, exc: AuthError) -> None:
    headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if exc.status == 401 else {}
    response = PlainTextResponse(exc.reason + "\n", status_code=exc.status, headers=headers)
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(response)
    else:  # a server without the extension: close before accept (HTTP 403)
        await websocket.close(code=1008)


async def _serve_device(websocket: WebSocket, state: FrontState) -> None:
    stats = state.stats
    try:
        device_id = verify_device_token(state.secret, token_from_request(websocket.headers, websocket.query_params))
    except AuthError as exc:
        stats.refused[exc.status] += 1
        await _deny(websocket, exc)
        return
    committer = state.committer
    assert committer is not None, "lifespan did not run"
    max_record = state.ring.max_record
    await websocket.accept()
    conn = committer.connect(device_id)
    writer = asyncio.get_running_loop().create_task(_write(websocket, conn))
    perf_counter, wall = time.perf_counter, time.time
    receive = websocket.receive
    try:
        while True:
            if not committer.has_room(conn):
                await committer.wait_room(conn)
            if conn.failed:
                break  # the writer closes with 1011; the device resends
            message = await receive()
            t_received = perf_counter()
            if message["type"] != "websocket.receive":
                if message.get("code") == CLOSE_TOO_BIG:
                    stats.errors["oversize"] += 1  # closed by the server from the frame header
                break  # websocket.disconnect (including 1009 from the server itself)
            frame = message.get("bytes")
            if frame is None:
                frame = message.get("text")
                if frame is None:
                    continue
            result = parse_frame(frame)
            if type(result) is ErrorReply:
                stats.errors[result.kind] += 1
                conn.reply(result.frame)
                continue
            payload = pack_record(device_id, result.seq, result.ts, wall(), result.data)  # type: ignore[union-attr]
            if len(payload) > max_record:
                too_large = reject(
                    "too_large",
                    f"message too large: its record is {len(payload)} bytes, the ring takes {max_record}",
                    result.seq,  # type: ignore[union-attr]
                    result.binary,  # type: ignore[union-attr]
                )
                stats.errors[too_large.kind] += 1
                conn.reply(too_large.frame)
                continue
            committer.submit(conn, result.seq, result.binary, payload, t_received)  # type: ignore[union-attr]
    except WebSocketDisconnect:
        pass
    finally:
        committer.disconnect(conn)
        if not writer.done():
            writer.cancel()
        try:
            await writer
        except asyncio.CancelledError:
            pass


async def _write(websocket: WebSocket, conn: Conn) -> None:
    """Send error replies and acks to one device, in order, until it goes away."""
    send = websocket.send
    try:
        while True:
            frames = await conn.outgoing()
            for frame in frames:
                if type(frame) is bytes:
                    await send({"type": "websocket.send", "bytes": frame})
                else:
                    await send({"type": "websocket.send", "text": frame})
            if conn.failed:
                await websocket.close(code=CLOSE_INTERNAL_ERROR, reason="could not persist; resend")
                return
    except (WebSocketDisconnect, OSError, RuntimeError):
        return  # the connection is gone (or closing): the reader sees the disconnect
