"""``router`` process (Procfile): receives monitors' batches, appends them to the fan-in ring, acks.

The stage itself is :mod:`node.pipeline.router`; this module only starts it.
"""

from __future__ import annotations

import zmq

from node import curve, health
from node.errors import ConfigError
from node.pipeline.router import Router, RouterError, bind_router, log
from node.workers.runtime import start


def main() -> None:
    settings, stop = start("router")
    from node.ring import Ring, RingError

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    link: curve.ServerLink | None = None
    try:
        try:
            ring = Ring.open(
                settings.ring_path("fanin"),
                capacity=settings.fanin_ring_bytes,
                durability=settings.durability,
            )
        except (RingError, OSError) as exc:
            raise RouterError(f"cannot open the fan-in ring {settings.ring_path('fanin')}: {exc}") from None
        try:
            sock, link = bind_router(ctx, settings)
        except ConfigError as exc:
            raise RouterError(f"configuration error: {exc}") from None
        log.info(
            "routing %s -> fan-in ring %s (%s, %d bytes, id %s, tail %d);"
            " <= %d batches / %d bytes per append, %d batches queued per monitor",
            settings.router_bind_endpoint,
            settings.ring_path("fanin"),
            ring.backend,
            ring.capacity,
            ring.incarnation.hex(),
            ring.tail,
            settings.router_gather_batches,
            settings.router_gather_bytes,
            settings.router_rcvhwm,
        )
        router = Router(settings, ring, sock)
        health.ready_when("fan-in ring", lambda: "closed" if ring.closed else None)
        if link is not None:
            router.watch_handshakes()
        try:
            router.run(stop)
        except RingError as exc:  # e.g. RingPersistError: nothing unpersisted was acked
            raise RouterError(f"fan-in ring {settings.ring_path('fanin')} failed: {exc}", status=1) from None
        log.info(
            "stopping: %d batches pending, %d source rings seen", len(router.pending), len(router.sources)
        )
        router.close()
        sock.close(linger=500)  # let the last acks reach the monitors
        ring.close()
    except RouterError as exc:
        log.error("%s", exc)
        raise SystemExit(exc.status) from None
    finally:
        if link is not None:
            link.stop()  # its thread's sockets must close before the context is destroyed
        ctx.destroy(linger=0)


if __name__ == "__main__":
    main()
