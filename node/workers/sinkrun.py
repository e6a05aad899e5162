"""What the storage sink processes (``postgres``, ``victoria``, ``lake``) share at start.

``start_sink(name, variable, value)`` reads the configuration (exit 2 on a bad
value), refuses to run without the sink's own variable (exit 2 naming it: such a
process was started by mistake, and stays down rather than pretending to store),
and loads the device registry strictly once (exit 2 naming
``NODE_DEVICE_REGISTRY`` and the bad line) before the watcher takes over.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

from node.config import Settings, load_settings
from node.registry import Registry, RegistryError, RegistryWatcher
from node.storage.source import StoreLog
from node.storage.tail import TailSink, run
from node.workers.runtime import start


def config_exit(variable: str, value: str, reason: str) -> None:
    print(f"iotnode: configuration error: {variable}={value!r}: {reason}", file=sys.stderr)
    raise SystemExit(2)


def main(name: str, variable: str, attr: str, make: Callable[[Settings], TailSink]) -> None:
    if getattr(load_settings(), attr) is None:
        config_exit(variable, "<unset>", f"the {name} sink needs {variable} (README, 'Storage tier')")
    settings, stop = start(name)
    log = logging.getLogger(f"node.storage.{name}")
    if settings.device_registry is not None:
        try:
            Registry.load(settings.device_registry)
        except RegistryError as exc:
            config_exit("NODE_DEVICE_REGISTRY", str(settings.device_registry), str(exc))
    sink = make(settings)
    serve(name, settings, sink, stop, log)


def serve(name: str, settings: Settings, sink: TailSink, stop: threading.Event, log: logging.Logger) -> None:
    watcher = RegistryWatcher(settings.device_registry, log)
    log.info(
        "%s: tailing %s, device registry %s (%d devices)",
        name,
        settings.store_path,
        settings.device_registry or "none",
        len(watcher.current()),
    )
    run(sink, StoreLog(settings.store_path), watcher, settings.sink_batch_rows, stop)
