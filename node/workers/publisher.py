"""``publisher`` process (Procfile): consumer of the fan-in ring: live XPUB stream and FETCH/CONFIRM replay.

The stage itself is :mod:`node.pipeline.publisher`; this module only starts it.
"""

from __future__ import annotations

import threading

import zmq

from node import health
from node.config import Settings
from node.errors import ConfigError
from node.metrics import watch_ring
from node.pipeline.publisher import Publisher, log
from node.ring.errors import RingError
from node.workers.runtime import start


def main() -> None:
    settings, stop = start("publisher")
    run(settings, stop)


def run(settings: Settings, stop: threading.Event) -> None:
    from node.ring import Ring

    path = settings.ring_path("fanin")
    try:
        ring = Ring.open(path, capacity=settings.fanin_ring_bytes, durability=settings.durability)
    except (RingError, OSError) as exc:
        log.error(
            "cannot open the fan-in ring %s (NODE_FANIN_RING_BYTES=%d): %s",
            path,
            settings.fanin_ring_bytes,
            exc,
        )
        raise SystemExit(1) from None
    watch_ring("fanin", ring)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        publisher = Publisher(settings, ring, ctx)
    except (RingError, zmq.ZMQError, ConfigError) as exc:
        status = 1
        if isinstance(exc, ConfigError):
            log.error("configuration error: %s", exc)
            status = 2
        elif isinstance(exc, RingError):
            log.error("cannot consume the fan-in ring %s: %s", path, exc)
        else:
            log.error(
                "cannot bind %s / %s (NODE_PUB_BIND / NODE_REPLAY_BIND): %s",
                settings.pub_endpoint,
                settings.replay_endpoint,
                exc,
            )
        stop.set()
        ctx.destroy(linger=0)
        ring.close()
        raise SystemExit(status) from None
    health.ready_when("fan-in ring", lambda: "closed" if ring.closed else None)
    log.info(
        "publisher: fan-in ring %s (%s, id %s, head %d, tail %d), XPUB %s, replay %s, durable subscribers %s",
        path,
        ring.backend,
        ring.incarnation.hex(),
        ring.head,
        ring.tail,
        settings.pub_endpoint,
        settings.replay_endpoint,
        ",".join(settings.durable_subscribers),
    )
    publisher.watch_stop(stop)
    failed: RingError | None = None
    try:
        while not stop.is_set():
            publisher.step()
    except RingError as exc:  # e.g. RingCorrupt met serving a FETCH: only a recovery repairs it
        failed = exc
    finally:
        stop.set()
        head = ring.head
        publisher.close()
        ctx.term()
        ring.close()
    if failed is not None:
        log.error("fan-in ring %s failed: %s; exiting so that the next start recovers it", path, failed)
        raise SystemExit(1)
    log.info("publisher: stopped (published up to %d, head %d)", publisher.published, head)


if __name__ == "__main__":
    main()
