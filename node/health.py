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

:func:`wrap` puts the two paths in front of any WSGI app (the Prometheus exposition
app); :func:`start_server` runs that on a daemon thread, as prometheus_client's
``start_http_server`` does.  Paths: :data:`HEALTH_PATH`, :data:`READY_PATH` (the
Kubernetes manifests' probes use them; ``tests/deploy`` checks that).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

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


def wrap(app: WsgiApp) -> WsgiApp:
    """``app`` with ``/healthz`` and ``/readyz`` answered before it."""

    def routed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == HEALTH_PATH:
            status, text = "200 OK", "ok"
        elif path == READY_PATH:
            ready, text = readiness()
            status = "200 OK" if ready else "503 Service Unavailable"
        else:
            return app(environ, start_response)
        body = (text + "\n").encode()
        start_response(
            status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        )
        return [body]

    return routed


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no access log per scrape or probe
        return None


def start_server(port: int, host: str, app: WsgiApp) -> WSGIServer:
    """Serve ``wrap(app)`` on ``host:port`` from a daemon thread; raises ``OSError`` if it cannot bind."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class Server(_Server):
        address_family = family

    httpd = make_server(host, port, wrap(app), Server, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd
