"""The live dashboard the fanout serves: a static page and two token-checked JSON endpoints.

::

    GET /, /dashboard          the page (static HTML; it holds no data)
    GET /static/...            its script and style sheet (shipped in the package, no CDN)
    GET /v1/devices            {"allowed": [...], "registry": bool, "devices": [context, ...]}
                               the contexts (node.registry) of the devices the token may see
    GET /v1/health             node health (node.fanout.health), scraped at most once a second
                               and shared by every open page

The data endpoints take the client token of the stream (``Authorization: Bearer``,
or ``?token=``) and answer 401/403 with ``{"error": reason}`` like the stream's
handshake does; the page itself streams ``/v1/stream`` with the same token.  A
user sees only the devices the token's ``devices`` claim allows; ``/v1/health``
holds node-wide numbers only (no device ids or values) and needs any valid client
token.  See docs/dashboard.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from prometheus_client import REGISTRY, generate_latest
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from node.auth import ALL_DEVICES, token_from_request, verify_client_token
from node.config import Settings
from node.errors import AuthError
from node.fanout.health import HealthCache, targets_of
from node.metrics import ERRORS
from node.registry import DeviceContext, Registry, RegistryWatcher

log = logging.getLogger("node.fanout.dashboard")

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
MAX_LISTED: Final = 10_000  # contexts in one /v1/devices answer (a "*" token over a large registry)

# The page loads only its own files and talks only to its own origin; the token
# must not leak through a Referer, and the page must not be framed.
_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def context_json(ctx: DeviceContext) -> dict[str, Any]:
    return {
        "device_id": ctx.device_id,
        "type": ctx.type,
        "class": ctx.class_,
        "region": ctx.region,
        "site": ctx.site,
        "lat": ctx.lat,
        "lon": ctx.lon,
        "geohash": ctx.geohash,
        "labels": dict(ctx.labels),
    }


def visible_devices(
    registry: Registry, allowed: frozenset[str], limit: int = MAX_LISTED
) -> list[dict[str, Any]]:
    """The contexts a token may see: the whole registry for ``*``, else its listed ids."""
    if ALL_DEVICES in allowed:
        return [context_json(ctx) for _, ctx in zip(range(limit), registry, strict=False)]
    return [context_json(registry.context(d)) for d in sorted(allowed)[:limit]]


def _refused(exc: AuthError) -> JSONResponse:
    ERRORS.labels(stage="fanout", reason="unauthorized" if exc.status == 401 else "forbidden").inc()
    return JSONResponse({"error": exc.reason, "status": exc.status}, exc.status, headers=_HEADERS)


def routes(
    settings: Settings,
    secret: str,
    local_metrics: Callable[[], str] | None = None,
) -> list[BaseRoute]:
    """The dashboard's routes, to add to the fanout app (``node.fanout.app``)."""
    watcher = RegistryWatcher(settings.device_registry, log)
    if local_metrics is None:

        def local_metrics() -> str:
            return generate_latest(REGISTRY).decode()

    health = HealthCache(targets_of(settings), local=local_metrics)

    def check(request: Request) -> frozenset[str]:
        return verify_client_token(secret, token_from_request(request.headers, request.query_params))

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "dashboard.html", media_type="text/html", headers=_HEADERS)

    async def devices(request: Request) -> Response:
        try:
            allowed = check(request)
        except AuthError as exc:
            return _refused(exc)
        registry = watcher.current()
        body = {
            "allowed": sorted(allowed),
            "registry": settings.device_registry is not None,
            "devices": visible_devices(registry, allowed),
        }
        return JSONResponse(body, headers=_HEADERS)

    async def node_health(request: Request) -> Response:
        try:
            check(request)
        except AuthError as exc:
            return _refused(exc)
        return JSONResponse(await health.get(), headers=_HEADERS)

    result: list[BaseRoute] = [
        Route("/", page),
        Route("/dashboard", page),
        Route("/v1/devices", devices),
        Route("/v1/health", node_health),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    return result
