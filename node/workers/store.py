"""``store`` process (Procfile): the durable subscriber that writes every record once into the sinks.

The stage itself is :mod:`node.pipeline.store`; this module only starts it.
"""

from __future__ import annotations

import threading

import zmq

from node import health
from node.config import Settings
from node.errors import ConfigError
from node.pipeline.store import Store, log, ring_name
from node.sinks.base import SinkError
from node.workers.runtime import start


def main() -> None:
    settings, stop = start("store")
    run(settings, stop)


def run(settings: Settings, stop: threading.Event) -> None:
    from node.sinks.sqlite import SqliteSink

    sink = SqliteSink(settings.store_path, settings.durability)
    try:
        sink.open()
    except SinkError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        store = Store(settings, sink, ctx)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        sink.close()
        ctx.term()
        raise SystemExit(2) from None
    store.watch_stop(stop)
    health.ready_when(
        "publisher", lambda: None if store.reconnector.connected else f"not connected to {store.endpoint}"
    )
    log.info(
        "store: %s, fetching from replay %s, durability %s",
        settings.store_path,
        store.endpoint,
        settings.durability,
    )
    try:
        store.start_fetch()  # probe: learn the ring id, then catch up from the cursor
        while not stop.is_set():
            store.step()
    except SinkError as exc:
        log.error("sink failed: %s", exc)
        raise SystemExit(1) from None
    finally:
        try:
            store.close()
        finally:
            sink.close()
            ctx.term()
    log.info("store: stopped at fan-in ring %s position %s", ring_name(store.ring), store.durable)


if __name__ == "__main__":
    main()
