"""What every stage process does at start: settings, logging, metrics, signals.

Usage in a worker module::

    def main() -> None:
        settings, stop = start("router")
        ...
        while not stop.is_set():
            ...

``start`` reads the configuration once (bad value -> message naming the variable,
exit status 2), configures logging, serves ``/metrics`` on the stage's port (on
``NODE_METRICS_HOST``, default 127.0.0.1: not ``NODE_HOST``, which exposes the
device and client-app servers; see docs/security.md), and turns SIGTERM/SIGINT
into ``stop`` being set so the loop can finish its current step and exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

from node import logredact, metrics
from node.config import Settings, load_settings
from node.privatefile import private_data_dir

_METRICS_PORT = {
    "monitor": "metrics_port_monitor",
    "router": "metrics_port_router",
    "publisher": "metrics_port_publisher",
    "store": "metrics_port_store",
    "postgres": "metrics_port_postgres",
    "victoria": "metrics_port_victoria",
    "lake": "metrics_port_lake",
}


def configure_logging(settings: Settings, name: str) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    logredact.install()  # no credential reaches a handler (node/logredact.py)


class Stop(threading.Event):
    """Set by SIGTERM/SIGINT.  ``fd`` becomes readable when the signal arrives (the
    interpreter's wakeup fd), so a stage that registers it in its poller wakes at once
    instead of polling on a short timeout: an idle stage can block for seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)


def start(name: str) -> tuple[Settings, threading.Event]:
    settings = load_settings()
    configure_logging(settings, name)
    private_data_dir(settings.data_path)  # umask 077, 0700 (docs/security.md)
    port_attr = _METRICS_PORT.get(name)
    if port_attr is not None:
        metrics.register_process(name)
        port = getattr(settings, port_attr)
        host = settings.metrics_host
        try:
            metrics.serve(port, host)
        except OSError as exc:
            var = "NODE_" + port_attr.upper()
            logging.getLogger(name).error(
                "cannot serve /metrics on %s:%s (NODE_METRICS_HOST=%s, %s=%s): %s",
                host,
                port,
                host,
                var,
                port,
                exc,
            )
            raise SystemExit(2) from None
    stop = Stop()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return settings, stop
