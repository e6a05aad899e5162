"""``store`` stage: the durable subscriber that writes every record once (contract 5).

Sockets: a SUB connected to the publisher's PUB (everything: topic ``b""``) and a
DEALER connected to its replay ROUTER (FETCH / RECORDS, CONFIRM).

State, per fan-in ring id:

* ``durable`` -- the cursor committed in the sink with the data (next position
  to store); confirmed to the publisher after every commit, every second, and at
  start, so a restarted publisher learns it and may pop everything before it.
* ``expect`` -- the next position wanted: ``durable`` plus the pending batch.

Live mode takes a published record only at ``pos == expect``; ``pos < expect`` is a
duplicate (ignored); ``pos > expect`` is a gap (PUB high-water mark drop, restart)
and switches to catch-up mode: FETCH from ``expect`` until the publisher's answer
reaches its tail, ignoring live records meanwhile.  A heartbeat whose published
position is beyond ``expect`` is a gap too (the tail of a burst was dropped).
The store starts in catch-up mode (probe FETCH to learn the ring id, then FETCH
from its cursor, or from the ring's head when the sink has no cursor for that ring
id: a new or recreated ring file).

Records are committed in batches (up to ``MAX_BATCH`` records, or when nothing more
is immediately available, or ``MAX_DELAY`` after the first pending one) with the
cursor in the same transaction (``Sink.write``): exactly once.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from node import wire
from node.config import Settings
from node.metrics import ERRORS, MESSAGES, STORE_COMMIT_SECONDS, STORE_GAPS, STORE_LAG_SECONDS
from node.record import Record, RecordError, unpack_record
from node.sinks.base import RecordRejected, Sink, SinkError
from node.workers.runtime import start

log = logging.getLogger("node.store")

NAME = "store"            # the name this subscriber confirms with (NODE_DURABLE_SUBSCRIBERS)
MAX_BATCH = 1000          # records per transaction
MAX_DELAY = 0.02          # s: longest a received record waits for its transaction
FETCH_MAX = 1000          # records asked per FETCH
FETCH_TIMEOUT = 2.0       # s: resend an unanswered FETCH (publisher restarted, request lost)
CONFIRM_INTERVAL = 1.0    # s: re-confirm the cursor even when idle
IDLE_POLL = 0.2           # s: longest block in poll (bounds SIGTERM latency)
DRAIN_BUDGET = 4 * MAX_BATCH  # messages handled per loop step before committing / polling


# Plain ints: pyzmq's recv_multipart asks RCVMORE after every frame (~2 us each).
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)


def ring_name(ring_id: bytes | None) -> str:
    return "-" if ring_id is None else ring_id.hex()


class Store:
    """The store's state machine over its two sockets and one sink."""

    def __init__(self, settings: Settings, sink: Sink, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.sink = sink
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, settings.pub_hwm)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(settings.pub_endpoint)
        self.dealer = ctx.socket(zmq.DEALER)
        # Queue nothing while the publisher is away (a FETCH is resent after its timeout
        # anyway): no burst of stale FETCHes and megabyte answers when it returns.
        self.dealer.setsockopt(zmq.IMMEDIATE, 1)
        self.dealer.setsockopt(zmq.SNDHWM, 100)
        self.dealer.setsockopt(zmq.RCVHWM, 8)
        self.dealer.setsockopt(zmq.LINGER, 500)  # give the last CONFIRM a chance at exit
        self.dealer.connect(settings.replay_endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.dealer, zmq.POLLIN)
        self.poller.register(self.sub, zmq.POLLIN)

        self.ring: bytes | None = None
        self.durable: int | None = None
        self.expect: int | None = None
        self.pending: list[Record] = []
        self.pending_since = 0.0
        self.pending_newest = 0.0  # received_at of the newest pending record
        self.dirty = False  # expect moved past durable (records or skipped bad ones)
        self.fetching = False
        self.fetch_from: int | None = None
        self.fetch_sent_at = 0.0
        self.last_confirm = 0.0

    # ------------------------------------------------------------------ ring id / cursor
    def adopt_ring(self, ring_id: bytes) -> None:
        """Switch to ``ring_id`` (first contact, or the ring file was recreated)."""
        if self.ring is not None:
            self.commit()
            log.warning(
                "fan-in ring id changed from %s to %s (ring file recreated): following the new ring",
                ring_name(self.ring), ring_name(ring_id),
            )
        self.ring = ring_id
        cursor = self.sink.cursor(ring_id)
        self.durable = self.expect = cursor
        if cursor is None:
            log.warning("no stored cursor for fan-in ring %s: starting from its head", ring_name(ring_id))
        else:
            log.info("resuming fan-in ring %s at position %d", ring_name(ring_id), cursor)
            self.confirm()
        self.start_fetch()

    def start_fetch(self, start: int | None = None) -> None:
        """FETCH from ``start`` (default: ``expect``; 0 = the head when unknown)."""
        self.fetching = True
        self.fetch_from = self.expect if start is None else start
        self.fetch_sent_at = time.monotonic()
        if self.ring is None:
            frames = wire.encode_fetch(b"", 0, 0)  # probe: the answer tells the ring id
        else:
            frames = wire.encode_fetch(self.ring, self.fetch_from or 0, FETCH_MAX)
        try:
            self.dealer.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass  # resent after FETCH_TIMEOUT

    # ------------------------------------------------------------------ incoming
    def on_published(self, frames: list[bytes]) -> None:
        if frames and frames[0] == wire.HEARTBEAT_TOPIC:
            ring_id, tail = wire.decode_heartbeat(frames)
            if ring_id != self.ring:
                self.adopt_ring(ring_id)
            elif not self.fetching and (self.expect is None or tail > self.expect):
                log.info("heartbeat: publisher is at %d, store at %s: fetching the gap", tail, self.expect)
                STORE_GAPS.inc()
                self.start_fetch()
            return
        ring_id, pos, end, record = wire.decode_published(frames)
        if ring_id != self.ring:
            self.adopt_ring(ring_id)
            return
        if self.fetching or self.expect is None or pos < self.expect:
            return  # catching up by FETCH, or a duplicate
        if pos > self.expect:
            log.info("gap in the live stream: expected position %d, got %d: fetching", self.expect, pos)
            STORE_GAPS.inc()
            self.start_fetch()
            return
        self.take(pos, end, record)

    def on_reply(self, frames: list[bytes]) -> None:
        reply = wire.decode_records(frames)
        if reply.ring != self.ring:
            self.adopt_ring(reply.ring)
            return
        if not self.fetching:
            return  # a late answer to a FETCH already resent and answered
        if self.expect is None:
            self.expect = reply.start  # no cursor for this ring: start at its head
        elif reply.start < self.expect:
            return  # stale answer (a resent FETCH answered twice)
        elif reply.start > self.expect:
            log.error(
                "records %d..%d of fan-in ring %s were released before the store had them"
                " (is %r in NODE_DURABLE_SUBSCRIBERS?): continuing at %d",
                self.expect, reply.start, ring_name(self.ring), NAME, reply.start,
            )
            ERRORS.labels(stage="store", reason="released_gap").inc()
            self.expect = reply.start
            self.dirty = True
        if not reply.items and reply.tail < self.expect:
            log.error(
                "store cursor %d is beyond the tail %d of fan-in ring %s (ring file replaced by an"
                " older copy?): waiting for the ring to reach it",
                self.expect, reply.tail, ring_name(self.ring),
            )
            ERRORS.labels(stage="store", reason="cursor_beyond_tail").inc()
        caught_up = not reply.items or reply.next >= reply.tail
        if not caught_up:
            # Ask for the next part before decoding this one: the publisher reads it
            # while the store decodes and commits (reply.start == expect, so the
            # items below bring expect to reply.next).
            self.start_fetch(reply.next)
        for item in reply.items:
            if item.end <= self.expect:
                continue
            self.take(item.pos, item.end, item.record)
        if caught_up:
            self.fetching = False  # back to the live stream

    def take(self, pos: int, end: int, payload: bytes) -> None:
        self.expect = end
        self.dirty = True
        try:
            record = unpack_record(payload)
        except RecordError as exc:
            log.error("fan-in ring %s position %d: %s: skipped", ring_name(self.ring), pos, exc)
            ERRORS.labels(stage="store", reason="bad_record").inc()
            return
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append(record)
        if isinstance(record.received_at, (int, float)) and record.received_at > self.pending_newest:
            self.pending_newest = float(record.received_at)

    # ------------------------------------------------------------------ commit / confirm
    def commit(self) -> None:
        if not self.dirty or self.ring is None or self.expect is None:
            return
        records = self.pending
        started = time.monotonic()
        while True:
            try:
                inserted = self.sink.write(records, self.ring, self.expect)
                break
            except RecordRejected as exc:
                log.error("fan-in ring %s: %s: skipped", ring_name(self.ring), exc)
                ERRORS.labels(stage="store", reason="rejected").inc()
                records = records[: exc.index] + records[exc.index + 1 :]
        now = time.time()
        STORE_COMMIT_SECONDS.observe(time.monotonic() - started)
        if self.pending_newest:
            STORE_LAG_SECONDS.set(max(0.0, now - self.pending_newest))
        MESSAGES.labels(stage="stored").inc(inserted)
        self.durable = self.expect
        self.pending = []
        self.pending_newest = 0.0
        self.dirty = False
        self.confirm()

    def confirm(self) -> None:
        if self.ring is None or self.durable is None:
            return
        self.last_confirm = time.monotonic()
        try:
            self.dealer.send_multipart(wire.encode_confirm(NAME, self.ring, self.durable), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the publisher is away; confirmed again within CONFIRM_INTERVAL

    # ------------------------------------------------------------------ loop
    def recv_reply(self) -> list[bytes]:
        return self.dealer.recv_multipart(_NOBLOCK)

    def recv_published(self) -> list[bytes]:
        """One message of the live stream, read by its known shape.

        Only the publisher writes to this stream: a record is 3 frames, a heartbeat
        2 (its topic cannot be a device topic, which ends in NUL).  RCVMORE is asked
        once, after the last expected frame, to drop anything longer whole.
        """
        recv = self.sub.recv
        first = recv(_NOBLOCK)  # zmq.Again when nothing is queued
        frames = [first, recv(_NOBLOCK)] if first == wire.HEARTBEAT_TOPIC else [first, recv(_NOBLOCK), recv(_NOBLOCK)]
        if self.sub.get(_RCVMORE):
            extra = 0
            while self.sub.get(_RCVMORE):
                recv(_NOBLOCK)
                extra += 1
            raise wire.WireError(f"live stream: {len(frames) + extra} frames after topic {first[:32]!r}")
        return frames

    def drain(self, ready: set[zmq.Socket[bytes]]) -> None:
        """Handle what is queued on the ``ready`` sockets, up to a batch; commit when due.

        A socket is tried again only while it has messages: a ``zmq.Again`` costs an
        exception (several us), so the idle one is not asked once per message.
        """
        active = [
            (recv, handler)
            for sock, recv, handler in (
                (self.dealer, self.recv_reply, self.on_reply),
                (self.sub, self.recv_published, self.on_published),
            )
            if sock in ready
        ]
        handled = 0
        while active and handled < DRAIN_BUDGET and len(self.pending) < MAX_BATCH:
            for entry in tuple(active):
                recv, handler = entry
                try:
                    frames = recv()
                    handled += 1
                    handler(frames)
                except zmq.Again:
                    active.remove(entry)
                except wire.WireError as exc:
                    log.warning("dropped a malformed message: %s", exc)
                    ERRORS.labels(stage="store", reason="wire").inc()
        if self.dirty and (
            not active  # nothing more queued: commit now rather than wait
            or len(self.pending) >= MAX_BATCH
            or time.monotonic() - self.pending_since >= MAX_DELAY
        ):
            self.commit()

    def step(self) -> None:
        now = time.monotonic()
        if self.fetching and now - self.fetch_sent_at >= FETCH_TIMEOUT:
            if self.ring is not None:
                log.info("FETCH from %s unanswered for %.1fs: asking again", self.fetch_from, FETCH_TIMEOUT)
            self.start_fetch()
        if now - self.last_confirm >= CONFIRM_INTERVAL:
            self.confirm()
        timeout = IDLE_POLL
        if self.dirty:
            timeout = max(0.0, min(timeout, self.pending_since + MAX_DELAY - now))
        events = self.poller.poll(int(timeout * 1000))
        if events:
            self.drain({sock for sock, _ in events})
        elif self.dirty:
            self.commit()

    def close(self) -> None:
        self.commit()
        self.sub.close()
        self.dealer.close()


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
    store = Store(settings, sink, ctx)
    log.info(
        "store: %s, subscribed to %s, replay %s, durability %s",
        settings.store_path, settings.pub_endpoint, settings.replay_endpoint, settings.durability,
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
