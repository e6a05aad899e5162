"""``/healthz`` and ``/readyz`` of the stage processes, served beside ``/metrics``.

* ``GET /healthz`` -- 200 ``ok`` while the process serves HTTP at all (liveness: a
  hung or dead process stops answering and is restarted).
* ``GET /readyz`` -- 200 ``ready`` when every readiness check the stage registered
  passes (its ring is open, the next stage is reachable), else 503 with the first
  failing check's reason; 503 ``starting`` before the stage registered any.

A stage registers its checks once it is set up (``node/workers/*.py``)::

    health.ready_when("router", lambda: None if monitor.connected else "not connected to the router")

A check returns ``None`` when fine or a short reason; it runs in the HTTP server's
thread, so it only reads state (no I/O, no locks held by the stage loop).

:func:`probe` answers the two paths (``node.metrics.serve``, the stages' bounded
HTTP server, asks it first); :func:`wrap` puts them in front of any WSGI app.
Paths: :data:`HEALTH_PATH`, :data:`READY_PATH` (the
Kubernetes manifests' probes use them; ``tests/deploy`` checks that).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, Final

HEALTH_PATH: Final = "/healthz"
READY_PATH: Final = "/readyz"

Check = Callable[[], "str | None"]
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_checks: dict[str, Check] = {}
_lock = threading.Lock()


def ready_when(name: str, check: Check) -> None:
    """Register (or replace) the readiness check ``name``."""
    with _lock:
        _checks[name] = check


def readiness() -> tuple[bool, str]:
    """``(ready, text)``: the first failing check's reason, or ``ready``."""
    with _lock:
        checks = list(_checks.items())
    if not checks:
        return False, "starting"
    for name, check in checks:
        try:
            reason = check()
        except Exception as exc:  # a check that fails is a not-ready answer, never a 500
            reason = f"check failed: {type(exc).__name__}"
        if reason is not None:
            return False, f"{name}: {reason}"
    return True, "ready"


def probe(path: str) -> tuple[int, str] | None:
    """``(HTTP status, text)`` for :data:`HEALTH_PATH` / :data:`READY_PATH`, else None."""
    if path == HEALTH_PATH:
        return 200, "ok"
    if path == READY_PATH:
        ready, text = readiness()
        return (200 if ready else 503), text
    return None


def answer(ready: Callable[[], str | None], path: str) -> tuple[int, str]:
    """``(status, text)`` of a web server's own probe: ``/healthz`` always 200, ``/readyz``
    200 when ``ready()`` returns None, else 503 with its reason (the web and fanout
    apps have no registered checks: each passes its own)."""
    if path == HEALTH_PATH:
        return 200, "ok"
    try:
        reason = ready()
    except Exception as exc:  # a failing check is a not-ready answer, never a 500
        reason = f"check failed: {type(exc).__name__}"
    return (503, reason) if reason is not None else (200, "ready")


def wrap(app: WsgiApp) -> WsgiApp:
    """``app`` with ``/healthz`` and ``/readyz`` answered before it."""

    def routed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        answer = probe(environ.get("PATH_INFO", ""))
        if answer is None:
            return app(environ, start_response)
        status, text = answer
        body = (text + "\n").encode()
        start_response(
            f"{status} {'OK' if status == 200 else 'Service Unavailable'}",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return routed
