"""``monitor`` process (Procfile): the ingress ring's consumer: forwards batches to the router.

The stage itself is :mod:`node.pipeline.monitor`; this module only starts it.
"""

from __future__ import annotations

import zmq

from node import health
from node.errors import ConfigError
from node.metrics import watch_ring
from node.pipeline.monitor import Monitor, MonitorError, log
from node.workers.runtime import start


def main() -> None:
    settings, stop = start("monitor")
    from node.ring import Ring
    from node.ring.errors import RingError

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        path = settings.ring_path("ingress")
        try:
            ring = Ring.open(path, capacity=settings.ingress_ring_bytes, durability=settings.durability)
            reader = ring.reader()
        except RingError as exc:
            raise MonitorError(f"cannot consume the ingress ring {path}: {exc}") from None
        watch_ring("ingress", ring)
        try:
            monitor = Monitor(ring, reader, ctx, settings)
        except ConfigError as exc:
            raise MonitorError(f"configuration error: {exc}") from None
        health.ready_when("ingress ring", lambda: "closed" if ring.closed else None)
        health.ready_when(
            "router",
            lambda: None if monitor.connected else f"not connected to {settings.router_connect_endpoint}",
        )
        log.info(
            "forwarding ingress ring %s (%s, id %s, head %d, tail %d) to %s"
            " (batches of <= %d records / %d bytes, window %d, ack timeout %gs..%gs)",
            path,
            ring.backend,
            ring.incarnation.hex(),
            ring.head,
            ring.tail,
            settings.router_connect_endpoint,
            monitor.batch_records,
            monitor.batch_bytes,
            monitor.window.size,
            monitor.ack_timeout,
            monitor.ack_timeout_max,
        )
        try:
            monitor.run(stop)
        except RingError as exc:  # a damaged ring: a restart reopens (and recovers) it
            log.error("ingress ring %s failed: %s", path, exc)
            raise SystemExit(1) from None
        log.info(
            "stopping: %d batches unacked stay in the ring (resent at next start)",
            len(monitor.window.flights),
        )
        monitor.close()
        ring.close()
    except MonitorError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    finally:
        ctx.destroy(linger=0)


if __name__ == "__main__":
    main()
