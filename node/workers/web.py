"""``web`` process (Procfile): uvicorn serving the device front with N workers.

    python -m node.workers.web

Reads the configuration once (a bad ``NODE_*`` value exits with status 2 and a
message naming the variable, before anything starts), then runs uvicorn with
``Settings.web_workers`` worker processes, each building the app from the factory
``node.front.app:create_app`` and opening the ingress ring itself in its lifespan.

C10K settings (see docs/front.md): listen backlog 4096+, RLIMIT_NOFILE soft limit
raised to the hard limit (here and in every worker), no per-message deflate
(a zlib context per connection costs ~64 KiB+ of memory and CPU per frame), keep-
alive pings from ``NODE_WS_PING_INTERVAL``/``_TIMEOUT`` (0 disables), frames over
``NODE_MAX_MESSAGE_BYTES`` closed with 1009 by the WebSocket layer from the frame
header, access log off (it would also log ``?token=``).

Hostile clients (docs/security.md): uvicorn gets the protocol classes of
:mod:`node.httpguard` (header cap, handshake deadline, connection counts, bounded
queued frames and unwritten bytes), and the listening socket, bound here, has
``TCP_USER_TIMEOUT`` (``NODE_TCP_USER_TIMEOUT_MS``), inherited by every accepted
connection: a peer that leaves our data unacknowledged that long is aborted.

uvicorn runs as :mod:`node.uvserver` (its ``Supervisor`` and ``Server``): no 10 Hz
main-loop tick in the workers, no 2 Hz health ping from the supervisor; an idle
front sleeps (issue 16).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys

import uvicorn

from node.auth import TokenPolicy, load_secret
from node.config import Settings, load_settings
from node.errors import NodeError
from node.front.app import raise_nofile_limit
from node.httpguard import HTTP_PROTOCOL, WS_PROTOCOL, set_user_timeout
from node.privatefile import private_data_dir
from node.uvserver import Server, Supervisor

#: uvicorn's sans-I/O websockets implementation: no reader task per connection
#: (the legacy one keeps one, plus one keep-alive task), pauses reading while the
#: app has not taken the last message (tight back-pressure), and checks the
#: frame size from its header.
WS_IMPLEMENTATION = "websockets-sansio"
BACKLOG_MIN = 4096


def backlog() -> int:
    """At least 4096, and the kernel's somaxconn when larger (the kernel caps at it)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as fh:
            return max(BACKLOG_MIN, int(fh.read().strip()))
    except (OSError, ValueError):
        return BACKLOG_MIN


def uvicorn_options(settings: Settings) -> dict[str, object]:
    def seconds(value: float) -> float | None:
        return value if value > 0 else None

    return dict(
        factory=True,
        host=settings.host,
        port=settings.web_port,
        workers=settings.web_workers,
        loop="uvloop",
        http=HTTP_PROTOCOL,  # httptools + node.httpguard's limits
        ws=WS_PROTOCOL,  # websockets-sansio + node.httpguard's limits
        ws_max_size=settings.max_message_bytes,
        ws_per_message_deflate=False,
        ws_ping_interval=seconds(settings.ws_ping_interval),
        ws_ping_timeout=seconds(settings.ws_ping_timeout),
        backlog=backlog(),
        access_log=False,
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )


def main() -> None:
    settings = load_settings()
    raise_nofile_limit()
    private_data_dir(settings.data_path)  # umask 077, 0700 (docs/security.md)
    # Create the secret (if generated) once, before the workers race for it; check the
    # deny-list file once here too, so a malformed one stops the start (status 2).
    try:
        load_secret(settings)
        TokenPolicy.from_settings(settings)
    except NodeError as exc:
        print(f"iotnode web: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    _check_bind(settings)
    _multiprocess_metrics_dir(settings)
    # node.front.metrics wraps node.front.app:create_app with the metrics seams and /metrics.
    # uvicorn.run(), except that the listening socket gets TCP_USER_TIMEOUT first.
    config = uvicorn.Config("node.front.metrics:create_app", **uvicorn_options(settings))  # type: ignore[arg-type]
    sock = config.bind_socket()
    set_user_timeout(sock, settings.tcp_user_timeout_ms)
    try:
        if config.workers > 1:
            Supervisor(config, sockets=[sock]).run()
        else:
            server = Server(config)
            server.run(sockets=[sock])
            if not server.started:
                raise SystemExit(3)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()


def _multiprocess_metrics_dir(settings: Settings) -> None:
    """The Procfile sets and wipes PROMETHEUS_MULTIPROC_DIR; started another way, do
    the same here (``NODE_DATA_DIR/metrics-web``, wiped: nothing of a previous run
    is summed in) so the workers' metrics are still aggregated.  Must run before
    anything imports prometheus_client (it reads the variable at import)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    path = settings.data_path / "metrics-web"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


def _check_bind(settings: Settings) -> None:
    """Fail with a message naming the variables when the address cannot be bound."""
    try:
        infos = socket.getaddrinfo(settings.host, settings.web_port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SystemExit(
            f"iotnode web: NODE_HOST={settings.host!r} does not resolve ({exc.strerror})"
        ) from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise SystemExit(
                f"iotnode web: cannot bind NODE_HOST={settings.host!r} NODE_WEB_PORT={settings.web_port}: "
                f"{exc.strerror}"
            ) from None


if __name__ == "__main__":
    main()
