"""``fanout`` entry point: the client-app stream (contract 4) under uvicorn, one process.

``python -m node.workers.fanout`` serves ``/v1/stream`` and ``/metrics`` on
``NODE_HOST:NODE_FANOUT_PORT``.  Exit status: 0 after SIGTERM/SIGINT (open streams
get close code 1012 from uvicorn, at most :data:`GRACE` seconds are waited), 2 for a
bad configuration value or a port that cannot be bound (the message names the
variable), 3 when the app could not start (e.g. the SUB socket refused the endpoint).
uvicorn's server is :class:`node.uvserver.Server` (no 10 Hz main-loop tick).
"""

from __future__ import annotations

import logging
import re
import signal
import socket
import sys
from types import FrameType

import uvicorn

from node import logredact
from node.auth import TokenPolicy, load_secret
from node.config import Settings, load_settings
from node.errors import NodeError
from node.fanout.app import create_app
from node.httpguard import HTTP_PROTOCOL, WS_PROTOCOL, Limits, install, set_user_timeout
from node.metrics import register_process
from node.privatefile import private_data_dir
from node.uvserver import Server
from node.workers.runtime import configure_logging

log = logging.getLogger("node.workers.fanout")

GRACE = 5  # seconds uvicorn waits for open streams at shutdown
MAX_CLIENT_FRAME = 4096  # client apps have nothing to say; bigger frames are closed with 1009

_TOKEN_IN_QUERY = re.compile(r"(token=)[^&\s\"']+")
_SPURIOUS_AFTER_DENIAL = "ASGI callable returned without completing handshake."


class _UvicornLogFilter(logging.Filter):
    """Keeps tokens out of uvicorn's log lines and drops one spurious error.

    * uvicorn logs request paths with their query string: ``?token=`` is redacted.
    * websockets-sansio logs "ASGI callable returned without completing handshake."
      after every denial response (uvicorn PR #3138, open).  Our endpoint always
      either accepts or sends a denial, so the line is only ever that false alarm.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message == _SPURIOUS_AFTER_DENIAL:
            return False
        if "token=" in message:
            record.msg = _TOKEN_IN_QUERY.sub(r"\1<redacted>", message)
            record.args = None
        return True


def _listen(settings: Settings) -> socket.socket:
    """Bind the listening socket ourselves so a busy port is reported with its variable."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.fanout_port))
    except OSError as exc:
        sock.close()
        log.error(
            "cannot listen on %s:%d (NODE_HOST=%s, NODE_FANOUT_PORT=%d): %s",
            settings.host,
            settings.fanout_port,
            settings.host,
            settings.fanout_port,
            exc.strerror or exc,
        )
        raise SystemExit(2) from None
    # Accepted connections inherit this: a client that leaves data unacknowledged (a
    # zero window: it stopped reading) for NODE_TCP_USER_TIMEOUT_MS is aborted by the
    # kernel, so a stalled client closed with 1013 does not keep its socket buffers forever.
    set_user_timeout(sock, settings.tcp_user_timeout_ms)
    sock.set_inheritable(True)
    return sock


def main() -> None:
    settings = load_settings()
    configure_logging(settings, "fanout")
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(_UvicornLogFilter())
    logredact.install()  # every handler: JWTs, Authorization values, ?token= in any spelling
    try:
        private_data_dir(settings.data_path)  # umask 077, 0700 (docs/security.md)
        secret = load_secret(settings)
        TokenPolicy.from_settings(settings)  # a malformed NODE_JWT_DENYLIST stops the start
    except (OSError, NodeError) as exc:
        log.error("cannot load the JWT secret (NODE_JWT_SECRET, or %s): %s", settings.jwt_secret_path, exc)
        raise SystemExit(2) from None
    sock = _listen(settings)
    register_process("fanout")  # iotnode_process_* on its /metrics
    install(Limits.from_settings(settings))  # node.httpguard: header cap, deadline, connection counts
    config = uvicorn.Config(
        create_app(settings, secret),
        lifespan="on",
        http=HTTP_PROTOCOL,  # httptools + node.httpguard's limits
        ws=WS_PROTOCOL,  # websockets-sansio + node.httpguard's limits
        ws_max_size=MAX_CLIENT_FRAME,
        # One record goes to many clients: per-connection deflate would cost CPU per
        # client per message (its context is per connection), so frames go uncompressed.
        ws_per_message_deflate=False,
        ws_ping_interval=settings.ws_ping_interval or None,
        ws_ping_timeout=settings.ws_ping_timeout or None,
        timeout_graceful_shutdown=GRACE,
        log_config=None,  # our logging (configure_logging), with the token filter above
        log_level=settings.log_level,
        access_log=False,
        proxy_headers=False,
        server_header=False,
    )
    server = Server(config)

    # uvicorn re-raises the signal it caught once it has shut down; make that a no-op
    # so SIGTERM ends with status 0 (contract 1: a clean stop is not a failure).
    def ignore(signum: int, frame: FrameType | None) -> None:
        return None

    signal.signal(signal.SIGTERM, ignore)
    signal.signal(signal.SIGINT, ignore)
    log.info(
        "fanout on ws://%s:%d/v1/stream, queue %d messages per client",
        settings.host,
        settings.fanout_port,
        settings.fanout_queue,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        log.error("fanout did not start (see the errors above)")
        sys.exit(3)


if __name__ == "__main__":
    main()
