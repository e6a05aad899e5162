"""``publisher`` stage: the single consumer of the fan-in ring.

* **Live stream** -- a PUB socket (``settings.pub_endpoint``) publishing every
  fan-in record as ``[device topic, [ring_id, pos, end], envelope]`` in ring order,
  read in batches; a heartbeat ``[ring_id, published_position]`` every
  ``HEARTBEAT_INTERVAL``.  ``pos`` is the position the record's span starts at
  (the previous record's ``end``; it differs from the record's own position only
  when wrap padding precedes it), so a subscriber holding cursor ``c`` takes
  exactly the record with ``pos == c`` next and anything else is a duplicate or a
  gap.  The PUB high-water mark (``NODE_PUB_HWM``) bounds memory: a slow
  subscriber loses live messages, never records -- it sees the gap and fetches.
* **Replay** -- a ROUTER (``settings.replay_endpoint``) answering FETCH with
  RECORDS read from the ring (only un-popped records exist: a ``from`` below the
  head is answered from the head) and taking CONFIRMs.
* **Release** -- the ring is popped only up to the minimum cursor confirmed by
  every durable subscriber (``NODE_DURABLE_SUBSCRIBERS``, default ``store``), never
  before all of them confirmed: a stopped store makes the ring fill, which pushes
  back on the router, the monitor and the devices.

No spin: the loop blocks in ``zmq.Poller.poll``; a doorbell thread blocks in
``reader.wait`` (GIL released) and pokes an ``inproc://`` PAIR when records are
committed past what was published.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import zmq

from node import wire
from node.config import Settings
from node.metrics import ERRORS, MESSAGES, watch_ring
from node.record import RecordError, device_id_of
from node.ring.errors import RingError, RingPositionError
from node.workers.doorbell import Doorbell
from node.workers.runtime import start

log = logging.getLogger("node.publisher")

READ_RECORDS = 256           # records per ring read / publish batch
READ_BYTES = 1 << 20
FETCH_MAX_RECORDS = 2048     # most records answered to one FETCH
FETCH_MAX_BYTES = 2 << 20
HEARTBEAT_INTERVAL = 0.5     # s
IDLE_POLL = 0.2              # s: longest block in poll (bounds SIGTERM latency)
REPLAY_BUDGET = 64           # replay-socket messages handled per loop step
BAD_TOPIC = wire.device_topic("")  # a record whose envelope cannot be read still keeps its place
# Plain-int flags: send_multipart ORs enum flags per frame, a measurable share per record.
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


class Publisher:
    def __init__(self, settings: Settings, ring: Any, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.ring = ring
        self.ring_id: bytes = ring.ring_id
        self.reader = ring.reader()
        self.durable = tuple(settings.durable_subscribers)
        self.confirmed: dict[str, int] = {}
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, settings.pub_hwm)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(settings.pub_endpoint)
        self.replay = ctx.socket(zmq.ROUTER)
        self.replay.setsockopt(zmq.SNDHWM, 1000)
        self.replay.setsockopt(zmq.RCVHWM, 1000)
        self.replay.setsockopt(zmq.LINGER, 0)
        self.replay.bind(settings.replay_endpoint)
        self.doorbell = Doorbell(ctx, self.reader, "publisher")
        self.poller = zmq.Poller()
        self.poller.register(self.replay, zmq.POLLIN)
        self.poller.register(self.doorbell.inbox, zmq.POLLIN)
        self.published = ring.head  # everything before it was published (or released)
        self.read_end = self.published  # highest record end read so far (a record boundary)
        self.last_heartbeat = 0.0

    # ------------------------------------------------------------------ live stream
    def publish_some(self) -> int:
        """Publish the next batch of committed records; returns how many."""
        records = self.reader.read(self.published, max_records=READ_RECORDS, max_bytes=READ_BYTES)
        if not records:
            return 0
        send = self.pub.send
        span = self.published
        for rec in records:
            try:
                topic = wire.device_topic(device_id_of(rec.payload))
            except RecordError as exc:
                log.error("fan-in ring position %d: %s: published under the empty topic", rec.pos, exc)
                ERRORS.labels(stage="publisher", reason="bad_record").inc()
                topic = BAD_TOPIC
            frames = wire.encode_published(topic, self.ring_id, span, rec.end, rec.payload)
            send(frames[0], _MORE)
            send(frames[1], _MORE)
            send(frames[2], _LAST)
            span = rec.end
        self.published = span
        if span > self.read_end:
            self.read_end = span
        MESSAGES.labels(stage="published").inc(len(records))
        return len(records)

    def heartbeat(self) -> None:
        self.last_heartbeat = time.monotonic()
        self.pub.send_multipart(wire.encode_heartbeat(self.ring_id, self.published), zmq.NOBLOCK)

    # ------------------------------------------------------------------ replay / confirm
    def on_replay(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            raise wire.WireError(f"replay: expected identity + message, got {len(frames)} frames")
        identity, body = frames[0], frames[1:]
        if body[0] == wire.CONFIRM:
            self.on_confirm(wire.decode_confirm(body))
        elif body[0] == wire.FETCH:
            self.on_fetch(identity, wire.decode_fetch(body))
        else:
            raise wire.WireError(f"replay: unknown verb {body[0][:16]!r}")

    def on_fetch(self, identity: bytes, fetch: wire.Fetch) -> None:
        head = self.ring.head
        start = head if fetch.ring != self.ring_id else max(fetch.start, head)
        count = max(0, min(fetch.max, FETCH_MAX_RECORDS))
        items: list[tuple[int, int, bytes]] = []
        if count:
            try:
                records = self.reader.read(start, max_records=count, max_bytes=FETCH_MAX_BYTES)
            except RingError as exc:  # not a record boundary, beyond the tail: a confused peer
                log.warning("FETCH from %d (head %d): %s: answered with no records", fetch.start, head, exc)
                ERRORS.labels(stage="publisher", reason="bad_fetch").inc()
                records = []
            span = start
            for rec in records:
                items.append((span, rec.end, rec.payload))
                span = rec.end
            if span > self.read_end:
                self.read_end = span
        next_pos = items[-1][1] if items else start
        reply = wire.encode_records(self.ring_id, start, next_pos, self.ring.tail, items)
        try:
            self.replay.send_multipart([identity, *reply], zmq.NOBLOCK)
        except zmq.Again:
            pass  # the subscriber is gone or flooded; it asks again after its timeout

    def on_confirm(self, confirm: wire.Confirm) -> None:
        if confirm.ring != self.ring_id:
            log.info("CONFIRM from %r for another ring %s ignored", confirm.name, confirm.ring.hex())
            return
        if confirm.name not in self.durable:
            return  # not a durable subscriber: its progress does not hold records
        if confirm.pos > self.ring.tail:
            log.error("CONFIRM from %r at %d is beyond the ring tail %d: ignored", confirm.name, confirm.pos, self.ring.tail)
            ERRORS.labels(stage="publisher", reason="bad_confirm").inc()
            return
        if confirm.pos > self.confirmed.get(confirm.name, -1):
            self.confirmed[confirm.name] = confirm.pos
            self.release()

    def release(self) -> None:
        """Pop up to the minimum cursor confirmed by every durable subscriber.

        Never past a position this reader has read (the ring's rule); a cursor not
        yet reached after a restart is popped to in steps as reading catches up.
        """
        if len(self.confirmed) < len(self.durable):
            return
        target = min(min(self.confirmed[name] for name in self.durable), self.read_end)
        if target <= self.ring.head:
            return
        try:
            self.reader.pop(target)
        except RingPositionError as exc:
            log.error("cannot pop to confirmed cursor %d: %s", target, exc)
            ERRORS.labels(stage="publisher", reason="bad_confirm").inc()
            return
        if self.published < target:
            self.published = target  # already durable downstream: no need to publish it again

    # ------------------------------------------------------------------ loop
    def step(self) -> None:
        n = self.publish_some()
        self.release()
        if n < READ_RECORDS:
            self.doorbell.arm()
        now = time.monotonic()
        if now - self.last_heartbeat >= HEARTBEAT_INTERVAL:
            self.heartbeat()
        timeout = 0 if n >= READ_RECORDS else min(IDLE_POLL, max(0.0, self.last_heartbeat + HEARTBEAT_INTERVAL - now))
        events = dict(self.poller.poll(int(timeout * 1000)))
        if self.doorbell.inbox in events:
            self.doorbell.drain()
        if self.replay in events:
            for _ in range(REPLAY_BUDGET):
                try:
                    frames = self.replay.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    self.on_replay(frames)
                except wire.WireError as exc:
                    log.warning("dropped a malformed replay message: %s", exc)
                    ERRORS.labels(stage="publisher", reason="wire").inc()

    def close(self) -> None:
        self.doorbell.close()
        self.pub.close()
        self.replay.close()


def main() -> None:
    settings, stop = start("publisher")
    run(settings, stop)


def run(settings: Settings, stop: threading.Event) -> None:
    from node.ring import Ring

    path = settings.ring_path("fanin")
    try:
        ring = Ring.open(path, capacity=settings.fanin_ring_bytes, durability=settings.durability)
    except (RingError, OSError) as exc:
        log.error("cannot open the fan-in ring %s (NODE_FANIN_RING_BYTES=%d): %s", path, settings.fanin_ring_bytes, exc)
        raise SystemExit(1) from None
    watch_ring("fanin", ring)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        publisher = Publisher(settings, ring, ctx)
    except (RingError, zmq.ZMQError) as exc:
        if isinstance(exc, RingError):
            log.error("cannot consume the fan-in ring %s: %s", path, exc)
        else:
            log.error(
                "cannot bind %s / %s (NODE_PUB_BIND / NODE_REPLAY_BIND): %s",
                settings.pub_endpoint, settings.replay_endpoint, exc,
            )
        stop.set()
        ctx.destroy(linger=0)
        ring.close()
        raise SystemExit(1) from None
    log.info(
        "publisher: fan-in ring %s (%s, id %s, head %d, tail %d), PUB %s, replay %s, durable subscribers %s",
        path, ring.backend, ring.ring_id.hex(), ring.head, ring.tail,
        settings.pub_endpoint, settings.replay_endpoint, ",".join(settings.durable_subscribers),
    )
    try:
        while not stop.is_set():
            publisher.step()
    finally:
        stop.set()
        head = ring.head
        publisher.close()
        ctx.term()
        ring.close()
    log.info("publisher: stopped (published up to %d, head %d)", publisher.published, head)


if __name__ == "__main__":
    main()
