"""The device front: a Starlette app serving ``/v1/ingest`` (contract 3).

A thin adapter: the handshake is checked with :mod:`node.auth` *before* the
upgrade (refusal = an HTTP 401/403 response through the WebSocket Denial Response
ASGI extension, no upgrade); each frame goes through :func:`node.protocol.parse_frame`;
accepted messages are packed into the ring envelope and handed to the worker's
:class:`node.front.committer.Committer`, which acks after the persist.

Under the node's own uvicorn protocol (``node.httpguard``) a connection runs on the
*direct lane* (:mod:`node.directlane`): each frame is parsed and submitted in a
synchronous callback of the protocol's ``data_received``, error replies are written
at once, and the committer writes the ack through ``Conn.on_ready`` right after the
persist that covers it; no window room pauses reading the socket.  Under another
server (no ``iotnode.direct`` scope extension) the ASGI path runs: per connection a
*reader* (this endpoint) waits for window room, receives a frame, and parses it; a
*writer* task sends what the committer and the parser left for the device (error
replies and the coalesced ack).  Either way a device that does not read its acks
never blocks the committer or other devices.

``create_app(settings=None, *, on_group=None, routes=(), commit_mode="auto")``
builds the app; the lifespan opens the ring *in the worker*, after the fork/spawn.
``node.front.metrics:create_app`` (the factory ``node.workers.web`` gives uvicorn)
wraps it with the metrics: ``on_group`` observes each persisted group and
``routes`` adds ``/metrics`` (contract 6).
``app.state.front`` holds the worker's :class:`FrontState` (committer, stats, ring).
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from node import logredact
from node.auth import TokenPolicy, load_secret, token_from_request, verify_device_claims
from node.config import Settings, load_settings
from node.directlane import EXTENSION, DirectLane
from node.errors import AuthError
from node.front.committer import Committer, Conn, FrontStats, GroupCallback
from node.front.sessions import CLOSE_TAKEN_OVER, REASON_TAKEN_OVER, Sessions, TakeoverFailed
from node.gcpolicy import GcPolicy
from node.httpguard import Limits, install
from node.protocol import ErrorReply, Message, parse_frame, reject
from node.record import pack_record

__all__ = ["FrontState", "create_app", "raise_nofile_limit"]

log = logging.getLogger("iotnode.front")

INGEST_PATH = "/v1/ingest"
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TOO_BIG = 1009
CLOSE_POLICY = 1008  # the token that opened the session expired or was revoked


@dataclass
class FrontState:
    settings: Settings
    secret: str
    stats: FrontStats
    policy: TokenPolicy | None = None  # NODE_JWT_REQUIRE_EXP / _MAX_TTL / _DENYLIST
    ring: Any = None  # node.ring.Ring once started
    committer: Committer | None = None
    gc: GcPolicy | None = None  # the worker's GC policy once started
    sessions: Sessions | None = None  # one session per device (node/front/sessions.py) once started
    # open device sessions: key -> (device id, token iat, end_with(code, reason)), for revocation
    revocable: dict[int, tuple[str, float | None, Callable[[int, str], None]]] = field(default_factory=dict)


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
                self._pattern.sub(r"\1<redacted>", arg) if isinstance(arg, str) else arg
                for arg in record.args
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
    logredact.install()  # every handler: JWTs, Authorization values, ?token= in any spelling


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
) -> Starlette:
    """Build the front.  ``commit_mode``: ``"auto"`` (inline on a pmem ring or with
    durability "process", else the commit thread), ``"thread"`` or ``"inline"``
    (for measurements).  Metrics and ``/metrics`` are plugged in by
    ``node.front.metrics:create_app`` through ``on_group`` and ``routes``."""
    if commit_mode not in ("auto", "thread", "inline"):
        raise ValueError(f"commit_mode must be auto, thread or inline, got {commit_mode!r}")
    settings = settings if settings is not None else load_settings()
    _install_logging(settings.log_level)
    install(Limits.from_settings(settings))  # node.httpguard, in this worker
    state = FrontState(
        settings=settings,
        secret=load_secret(settings),
        stats=FrontStats(),
        policy=TokenPolicy.from_settings(settings),
    )

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
            on_group=on_group,
            stats=state.stats,
            interval=settings.web_commit_interval,
        )
        await committer.start()
        sessions = Sessions(settings.data_path / "sessions")
        sessions.start()
        state.ring, state.committer, state.sessions = ring, committer, sessions
        log.info(
            "ingress ring %s (backend %s, %s commit), window %d",
            settings.ring_path("ingress"),
            ring.backend,
            "threaded" if threaded else "inline",
            settings.conn_window,
        )
        # Start-up objects and accepted connections are frozen, no automatic full
        # collection (they paused the loop 0.5-4 s at 10k connections): node/gcpolicy.py.
        gc_policy = GcPolicy()
        gc_policy.start()
        gc_task = asyncio.get_running_loop().create_task(gc_policy.run(), name="iotnode-gc")
        state.gc = gc_policy
        revoker = asyncio.get_running_loop().create_task(_revoke_periodically(state), name="iotnode-revoke")
        try:
            yield
        finally:
            revoker.cancel()
            gc_task.cancel()
            sessions.stop()
            await committer.stop()
            ring.close()
            gc_policy.restore()

    async def ingest(websocket: WebSocket) -> None:
        await _serve_device(websocket, state)

    app = Starlette(routes=[WebSocketRoute(INGEST_PATH, ingest), *routes], lifespan=lifespan)
    app.state.front = state
    return app


async def _revoke_periodically(state: FrontState) -> None:
    """When NODE_JWT_DENYLIST changes, end the open sessions it now refuses (1008)."""
    denylist = state.policy.denylist if state.policy is not None else None
    if denylist is None:
        return
    seen = denylist.version
    while True:
        await asyncio.sleep(denylist.CHECK_EVERY)
        version = denylist.check()
        if version == seen:
            continue
        seen = version
        for device_id, issued_at, end_with in list(state.revocable.values()):
            if denylist.refuses(device_id, issued_at):
                log.warning("device %r: token revoked (NODE_JWT_DENYLIST), closing its session", device_id)
                end_with(CLOSE_POLICY, "token revoked")


async def _deny(websocket: WebSocket, exc: AuthError) -> None:
    headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if exc.status == 401 else {}
    response = PlainTextResponse(exc.reason + "\n", status_code=exc.status, headers=headers)
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(response)
    else:  # a server without the extension: close before accept (HTTP 403)
        await websocket.close(code=1008)


async def _deny_busy(websocket: WebSocket) -> None:
    response = PlainTextResponse(
        "an older session of this device is still settling; retry\n", status_code=503
    )
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(response)
    else:
        await websocket.close(code=1013)


async def _serve_device(websocket: WebSocket, state: FrontState) -> None:
    stats = state.stats
    if state.gc is not None:
        state.gc.note_garbage()  # a handshake leaves a few cycles; the next GC tick collects young
    try:
        device_id, expires_at, issued_at = verify_device_claims(
            state.secret, token_from_request(websocket.headers, websocket.query_params), state.policy
        )
    except AuthError as exc:
        stats.refused[exc.status] += 1
        await _deny(websocket, exc)
        return
    committer, sessions = state.committer, state.sessions
    assert committer is not None and sessions is not None, "lifespan did not run"
    conn = committer.connect(device_id)
    # One session per device: older ones (in any worker) settle and close with 4000 first.
    try:
        session = await sessions.begin(device_id, lambda: bool(conn.unacked) and not conn.failed)
    except TakeoverFailed as exc:
        committer.disconnect(conn)
        stats.refused[503] += 1
        log.warning("device %r: %s; refused with 503", device_id, exc)
        await _deny_busy(websocket)
        return
    try:
        await websocket.accept()
    except BaseException:
        committer.disconnect(conn)
        sessions.end(session)
        raise
    # How the session ends early: a newer one took over (4000), its token expired (1008).
    # Either way it stops taking frames, settles, sends its last ack, then closes.
    ending: list[tuple[int, str]] = []

    def end_with(code: int, reason: str) -> None:
        if not ending:
            ending.append((code, reason))
            conn.close_when_settled()

    direct = websocket.scope.get("extensions", {}).get(EXTENSION)
    lane = direct["open"]() if direct is not None else None  # before anything can end the session
    session.on_taken(lambda: end_with(CLOSE_TAKEN_OVER, REASON_TAKEN_OVER))
    loop = asyncio.get_running_loop()
    timer = None
    if expires_at is not None:  # the session lasts no longer than the token that opened it
        timer = loop.call_later(max(0.0, expires_at - time.time()), end_with, CLOSE_POLICY, "token expired")
    state.revocable[id(conn)] = (device_id, issued_at, end_with)
    take = _frame_taker(state, conn, ending)
    try:
        if lane is not None:
            await _serve_direct(lane, take, committer, conn, ending, stats)
        else:
            await _serve_asgi(websocket, take, committer, conn, ending, stats)
    finally:
        conn.on_ready = None
        state.revocable.pop(id(conn), None)
        if timer is not None:
            timer.cancel()
        committer.disconnect(conn)
        sessions.end(session)
        if state.gc is not None:
            state.gc.note_garbage(ended=True)  # a closed connection's objects are cyclic


def _frame_taker(
    state: FrontState, conn: Conn, ending: list[tuple[int, str]]
) -> Callable[[bytes | str, float], bytes | str | None]:
    """The per-frame work of one connection, free of I/O: parse, envelope, submit.
    ``take(frame, t_received)`` returns the error reply to send (or None)."""
    committer, stats = state.committer, state.stats
    assert committer is not None
    device_id, max_record, wall = conn.device_id, state.ring.max_record, time.time
    submit, errors = committer.submit, stats.errors

    def take(frame: bytes | str, t_received: float) -> bytes | str | None:
        result = parse_frame(frame)
        if type(result) is ErrorReply:
            errors[result.kind] += 1
            return result.frame
        message = cast(Message, result)
        payload = pack_record(device_id, message.seq, message.ts, wall(), message.data)
        if len(payload) > max_record:
            too_large = reject(
                "too_large",
                f"message too large: its record is {len(payload)} bytes, the ring takes {max_record}",
                message.seq,
                message.binary,
            )
            errors[too_large.kind] += 1
            return too_large.frame
        if ending:
            return None  # taken over or expired: the device resends on its next connection
        submit(conn, message.seq, message.binary, payload, t_received)
        return None

    return take


async def _serve_direct(
    lane: DirectLane,
    take: Callable[[bytes | str, float], bytes | str | None],
    committer: Committer,
    conn: Conn,
    ending: list[tuple[int, str]],
    stats: FrontStats,
) -> None:
    """The direct lane (node/directlane.py): frames are taken in ``on_frame``, called
    from the protocol's ``data_received``; replies are written at once; the committer
    calls ``on_ready`` after each persist that covers this connection (the ack is
    written then, in the committer's step), when it failed, or when the session ends.
    No window room pauses the lane (the socket is not read) until ``on_ready`` sees
    room again."""
    perf_counter = time.perf_counter
    paused_at = 0.0  # perf_counter() when the lane paused for room, else 0
    send = lane.send

    def on_frame(frame: bytes | str) -> None:
        nonlocal paused_at
        if conn.failed:
            return  # being closed with 1011; the device resends
        reply = take(frame, perf_counter())
        if reply is not None:
            send(reply)
        if not committer.has_room(conn):
            lane.pause()
            paused_at = perf_counter()
            committer.notify_room(conn)

    def on_ready() -> None:
        nonlocal paused_at
        for frame in conn.take():
            send(frame)
        if conn.failed:
            lane.close(CLOSE_INTERNAL_ERROR, "could not persist; resend")
        elif ending and not conn.unacked:  # settled: the last ack is sent
            lane.close(*ending[0])
        elif paused_at:
            if committer.has_room(conn):
                stats.paused += 1
                stats.paused_seconds += perf_counter() - paused_at
                paused_at = 0.0
                lane.resume()
            else:
                committer.notify_room(conn)

    conn.on_ready = on_ready
    stats.direct += 1
    lane.start(on_frame)
    on_ready()  # the session may have ended already (taken over before the lane opened)
    if await lane.done == CLOSE_TOO_BIG:
        stats.errors["oversize"] += 1  # closed by the server from the frame header


async def _serve_asgi(
    websocket: WebSocket,
    take: Callable[[bytes | str, float], bytes | str | None],
    committer: Committer,
    conn: Conn,
    ending: list[tuple[int, str]],
    stats: FrontStats,
) -> None:
    """The ASGI path (a server without the direct lane): a reader (this coroutine)
    and a writer task per connection."""
    writer = asyncio.get_running_loop().create_task(_write(websocket, conn, ending))
    perf_counter = time.perf_counter
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
            reply = take(frame, t_received)
            if reply is not None:
                conn.reply(reply)
    except WebSocketDisconnect:
        pass
    finally:
        if not writer.done():
            writer.cancel()
        try:
            await writer
        except asyncio.CancelledError:
            pass


async def _write(websocket: WebSocket, conn: Conn, ending: list[tuple[int, str]]) -> None:
    """Send error replies and acks to one device, in order, until it goes away (or,
    once ``ending`` holds a close code and nothing is in flight, close with it)."""
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
            if ending and not conn.unacked:  # settled: the last ack is sent
                code, reason = ending[0]
                await websocket.close(code=code, reason=reason)
                return
    except (WebSocketDisconnect, OSError, RuntimeError):
        return  # the connection is gone (or closing): the reader sees the disconnect
