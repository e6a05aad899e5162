"""The fanout's ASGI app: the ``/v1/stream`` endpoint (contract 4) and ``/metrics``.

The hub (:mod:`node.fanout.hub`) holds the SUB socket and the clients; this module is
the Starlette adapter: handshake checks, one sender task per client, close codes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from node import health
from node.auth import TokenPolicy, token_expiry, token_from_request, verify_client_token
from node.config import Settings
from node.errors import AuthError
from node.fanout.hub import (
    CLOSE_GOING_AWAY,
    CLOSE_TIMEOUT,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOO_SLOW,
    STREAM_PATH,
    Client,
    Hub,
    StreamRefused,
    log,
    select_devices,
)
from node.gcpolicy import GcPolicy
from node.metrics import (
    ERRORS,
    FANOUT_CLIENTS,
    CachedExposition,
)


# ------------------------------------------------------------------- the endpoint
async def _send_loop(websocket: WebSocket, client: Client) -> None:
    """Write the client's queue to its socket; close with 1013 when it overflowed."""
    queue = client.queue
    while True:
        await client.wait()
        while queue and not client.overflowed and client.missed is None:
            await websocket.send_text(client.take())
        if client.overflowed:
            await asyncio.wait_for(websocket.close(CLOSE_TOO_SLOW, client.overflow_reason), CLOSE_TIMEOUT)
            return
        if client.missed is not None:
            await asyncio.wait_for(websocket.close(CLOSE_TOO_SLOW, client.missed), CLOSE_TIMEOUT)
            return
        if client.stopping:
            await asyncio.wait_for(websocket.close(CLOSE_GOING_AWAY, "server shutting down"), CLOSE_TIMEOUT)
            return
        if client.expired:
            await asyncio.wait_for(websocket.close(CLOSE_TOKEN_EXPIRED, "token expired"), CLOSE_TIMEOUT)
            return


async def _drain_incoming(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, so pings/close are seen; end at disconnect."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


def create_app(settings: Settings, secret: str) -> Starlette:
    """The fanout's ASGI app: ``/v1/stream`` and ``/metrics`` (one process, default registry)."""
    hub_holder: list[Hub] = []
    policy = TokenPolicy.from_settings(settings)  # NODE_JWT_REQUIRE_EXP / _MAX_TTL / _DENYLIST
    # The web workers' GC policy (node/gcpolicy.py): many client connections must not
    # make full collections stall the stream either.
    gc_policy = GcPolicy()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub = Hub(
            settings.pub_connect_endpoint,
            hwm=settings.pub_hwm,
            queue_limit=settings.fanout_queue,
            settings=settings,
        )
        hub.start()
        hub_holder.append(hub)
        app.state.hub = hub
        gc_policy.start()
        gc_task = asyncio.get_running_loop().create_task(gc_policy.run(), name="iotnode-gc")
        try:
            yield
        finally:
            gc_task.cancel()
            await hub.close()
            gc_policy.restore()

    async def refuse(websocket: WebSocket, status: int, reason: str) -> None:
        response = PlainTextResponse(reason + "\n", status_code=status)
        try:
            await websocket.send_denial_response(response)
        except RuntimeError:  # server without the denial extension: plain 403
            await websocket.close(code=1008)

    async def stream(websocket: WebSocket) -> None:
        gc_policy.note_garbage()  # a handshake leaves a few cycles
        try:
            try:
                token = token_from_request(websocket.headers, websocket.query_params)
                allowed = verify_client_token(secret, token, policy)
                expires_at = token_expiry(token)
            except AuthError as exc:
                reason = "unauthorized" if exc.status == 401 else "forbidden"
                raise StreamRefused(exc.status, exc.reason, reason) from None
            selection = select_devices(websocket.query_params.getlist("device"), allowed)
        except StreamRefused as exc:
            ERRORS.labels(stage="fanout", reason=exc.metric_reason).inc()
            await refuse(websocket, exc.status, exc.reason)
            return
        hub = hub_holder[0]
        client = Client(selection, settings.fanout_queue, settings.fanout_queue_bytes)
        hub.add(
            client
        )  # subscribe before accepting: the subscription's trip to the publisher overlaps the upgrade
        try:
            await websocket.accept()
            with FANOUT_CLIENTS.track_inprogress():
                await _serve(websocket, client, expires_at)
        except WebSocketDisconnect:
            pass
        finally:
            hub.remove(client)
            gc_policy.note_garbage(ended=True)

    exposition = CachedExposition(lambda: generate_latest(REGISTRY))  # rate-limited renders

    async def metrics(request: Request) -> Response:
        return Response(exposition.get(), media_type=CONTENT_TYPE_LATEST)

    def fanout_ready() -> str | None:
        if not hub_holder:
            return "starting"
        return (
            None
            if hub_holder[0].connected
            else f"not connected to the publisher at {settings.pub_connect_endpoint}"
        )

    async def probe(request: Request) -> Response:
        status, text = health.answer(fanout_ready, request.url.path)
        return PlainTextResponse(text + "\n", status_code=status)

    return Starlette(
        routes=[
            WebSocketRoute(STREAM_PATH, stream),
            Route("/metrics", metrics),
            Route(health.HEALTH_PATH, probe),
            Route(health.READY_PATH, probe),
            *_dashboard(settings, secret),
        ],
        lifespan=lifespan,
    )


def _dashboard(settings: Settings, secret: str) -> list[BaseRoute]:
    """The live dashboard's page and JSON endpoints (node/fanout/dashboard.py)."""
    from node.fanout.dashboard import routes

    return routes(settings, secret)


async def _serve(websocket: WebSocket, client: Client, expires_at: float | None) -> None:
    what = "every device" if client.selection.everything else f"{len(client.selection.devices)} device(s)"
    log.info("client app %s follows %s", _peer(websocket), what)
    sender = asyncio.ensure_future(_send_loop(websocket, client))
    receiver = asyncio.ensure_future(_drain_incoming(websocket))
    timer = None
    if expires_at is not None:  # the stream lasts no longer than the token that opened it
        timer = asyncio.get_running_loop().call_later(max(0.0, expires_at - time.time()), client.expire)
    try:
        await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if timer is not None:
            timer.cancel()
        for task in (sender, receiver):
            task.cancel()
        for result in await asyncio.gather(sender, receiver, return_exceptions=True):
            if isinstance(
                result, (WebSocketDisconnect, OSError, asyncio.TimeoutError, asyncio.CancelledError)
            ):
                continue
            if isinstance(result, BaseException):
                log.error("client app %s: %s: %s", _peer(websocket), type(result).__name__, result)
    log.info("client app %s left", _peer(websocket))


def _peer(websocket: WebSocket) -> str:
    client = websocket.client
    return f"{client.host}:{client.port}" if client else "?"
