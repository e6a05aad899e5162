"""What every stage process does at start: settings, logging, metrics, signals.

Usage in a worker module::

    def main() -> None:
        settings, stop = start("router")
        ...
        while not stop.is_set():
            ...

``start`` reads the configuration once (bad value -> message naming the variable,
exit status 2), configures logging, serves ``/metrics`` on the stage's port (on
``NODE_HOST``), and turns SIGTERM/SIGINT into ``stop`` being set so the loop can
finish its current step and exit 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from node import metrics
from node.config import Settings, load_settings

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


def start(name: str) -> tuple[Settings, threading.Event]:
    settings = load_settings()
    configure_logging(settings, name)
    settings.data_path.mkdir(parents=True, exist_ok=True)
    port_attr = _METRICS_PORT.get(name)
    if port_attr is not None:
        metrics.register_process(name)
        port = getattr(settings, port_attr)
        try:
            metrics.serve(port, settings.host)
        except OSError as exc:
            var = "NODE_" + port_attr.upper()
            logging.getLogger(name).error(
                "cannot serve /metrics on %s:%s (%s=%s): %s", settings.host, port, var, port, exc
            )
            raise SystemExit(2) from None
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return settings, stop
