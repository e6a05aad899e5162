"""``store`` stage: the durable subscriber that writes every record once (contract 5).

One socket: a DEALER connected to the publisher's replay ROUTER.  The store
*pulls* batches: it always has one ``FETCH`` (with ``wait``: a long poll) from its
position outstanding, and sends the next one as soon as a ``RECORDS`` arrives,
before decoding and committing that one, so the publisher reads the ring while
the store commits.  A RECORDS answer is three frames whatever its size
(``node.wire``); the live PUB stream is not used at all.

State, per fan-in ring id:

* ``durable`` -- the cursor committed in the sink with the data (next position
  to store); confirmed to the publisher after every commit, at start, after every
  reconnection, and again at the first wake-up ``CONFIRM_INTERVAL`` after the last
  one (idle: with each long poll), so a restarted publisher learns it and may pop
  everything before it.
* ``expect`` -- the next position wanted: ``durable`` plus the pending batch.
* ``fetch_from`` -- the ``from`` of the outstanding FETCH; an answer whose ``ask``
  is another position is stale (a resent FETCH answered twice) and ignored.

An outstanding FETCH is resent, with a CONFIRM, as soon as the DEALER's connection
handshake succeeds again (the publisher restarted: what it had parked is lost), and
an unanswered one after ``FETCH_TIMEOUT`` (a request lost without a disconnection);
one that could not be sent (no connection yet) after ``SEND_RETRY``.  The
publisher answers a parked one after at most its ``PARK_TIMEOUT`` (shorter), so
silence means it is gone.  An idle store therefore wakes once per long poll
(``PARK_TIMEOUT``, 5 s), not on timers of its own (issue 16).  An empty answer that comes back at once
(not a long-poll timeout: e.g. the cursor is beyond the ring's tail) is asked
again only after ``EMPTY_RETRY``.  The store starts with a probe FETCH to learn the
ring id, then fetches from its cursor, or from the ring's head when the sink has
no cursor for that ring id (a new or recreated ring file).

Records are committed in batches (one RECORDS answer, up to ``MAX_BATCH`` records,
or ``MAX_DELAY`` after the first pending one) with the cursor in the same
transaction (``Sink.write``): exactly once.
"""

from __future__ import annotations

import logging
import time

import zmq

from node import curve, wire
from node.config import Settings
from node.metrics import ERRORS, MESSAGES, STORE_COMMIT_SECONDS, STORE_GAPS, STORE_LAG_SECONDS
from node.pipeline.inbox import register_stop, take_queued
from node.record import Record, RecordError, unpack_record
from node.sinks.base import RecordRejected, Sink

log = logging.getLogger("node.store")

NAME = "store"  # the name this subscriber confirms with (NODE_DURABLE_SUBSCRIBERS)
MAX_BATCH = 2000  # records per transaction
MAX_DELAY = 0.02  # s: longest a received record waits for its transaction
FETCH_MAX = 2000  # records asked per FETCH
#: s: resend an unanswered FETCH (a request lost); must exceed the publisher's PARK_TIMEOUT (5 s).
#: A restarted publisher is noticed sooner: the reconnection's handshake resends at once.
FETCH_TIMEOUT = 8.0
EMPTY_RETRY = 0.5  # s: wait before asking again after an immediate empty answer
SEND_RETRY = 0.05  # s: retry a FETCH the DEALER could not send (no connection: ZMQ_IMMEDIATE)
QUICK_EMPTY = 0.05  # s: an empty answer faster than this was not a long-poll timeout
CONFIRM_INTERVAL = 1.0  # s: re-confirm the cursor at the next wake-up this long after the last CONFIRM
IDLE_POLL = 0.2  # s: longest block in poll when a signal cannot wake it (bounds SIGTERM latency)
IDLE_POLL_WOKEN = 60.0  # s: the same once the stop fd is in the poller (watch_stop): no idle wake of its own
DRAIN_BUDGET = 8  # answers handled per loop step before committing / polling

_NOBLOCK = int(zmq.NOBLOCK)


def ring_name(ring_id: bytes | None) -> str:
    return "-" if ring_id is None else ring_id.hex()


class Store:
    """The store's state machine over its replay socket and one sink."""

    def __init__(self, settings: Settings, sink: Sink, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.sink = sink
        self.dealer = ctx.socket(zmq.DEALER)
        # Queue nothing while the publisher is away (a FETCH is resent after its timeout
        # anyway): no burst of stale FETCHes and megabyte answers when it returns.
        self.dealer.setsockopt(zmq.IMMEDIATE, 1)
        self.dealer.setsockopt(zmq.SNDHWM, 100)
        self.dealer.setsockopt(zmq.RCVHWM, 8)
        self.dealer.setsockopt(zmq.LINGER, 500)  # give the last CONFIRM a chance at exit
        # ZMTP heartbeats: a publisher that vanished without closing (host down, cut link,
        # half-open tcp://) drops the connection, and libzmq connects again.
        self.dealer.setsockopt(zmq.HEARTBEAT_IVL, curve.HEARTBEAT_IVL_MS)
        self.dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, curve.HEARTBEAT_TIMEOUT_MS)
        self.endpoint = settings.replay_connect_endpoint
        # On tcp:// a CURVE client of the publisher (node.curve); a refused handshake is
        # retried by the Reconnector (libzmq gives up on it).
        keypair = curve.secure_client(
            self.dealer, settings, self.endpoint, settings.curve_publisher_key, "NODE_REPLAY_CONNECT", log
        )
        self.reconnector = curve.Reconnector(
            self.dealer,
            self.endpoint,
            "publisher",
            curve.client_hint(keypair, "NODE_CURVE_SUBSCRIBERS_DIR", "NODE_CURVE_PUBLISHER_KEY"),
            "store",
            log,
        )
        self.dealer.connect(self.endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.dealer, zmq.POLLIN)
        self.poller.register(self.reconnector.events, zmq.POLLIN)  # a (re)connection wakes the loop
        self.handshakes = 0  # the reconnector's count the outstanding FETCH was sent after
        self.idle_poll = IDLE_POLL

        self.ring: bytes | None = None
        self.durable: int | None = None
        self.expect: int | None = None
        self.pending: list[Record] = []
        self.pending_since = 0.0
        self.pending_newest = 0.0  # received_at of the newest pending record
        self.dirty = False  # expect moved past durable (records or skipped bad ones)
        self.fetch_from: int | None = None
        self.fetch_sent_at = 0.0
        self.fetch_due = 0.0  # when to send the FETCH again if nothing useful arrived
        self.last_confirm = 0.0

    # ------------------------------------------------------------------ ring id / cursor
    def adopt_ring(self, ring_id: bytes) -> None:
        """Switch to ``ring_id`` (first contact, or the ring file was recreated)."""
        if self.ring is not None:
            self.commit()
            log.warning(
                "fan-in ring id changed from %s to %s (ring file recreated): following the new ring",
                ring_name(self.ring),
                ring_name(ring_id),
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
        """FETCH (long poll) from ``start`` (default: ``expect``; 0 = the head when unknown)."""
        self.fetch_from = (self.expect or 0) if start is None else start
        now = time.monotonic()
        self.fetch_sent_at = now
        self.fetch_due = now + FETCH_TIMEOUT
        if self.ring is None:
            frames = wire.encode_fetch(b"", 0, 0)  # probe: the answer tells the ring id
        else:
            frames = wire.encode_fetch(self.ring, self.fetch_from, FETCH_MAX, wait=True)
        try:
            self.dealer.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:  # not connected (yet, or the publisher restarts): try again soon
            self.fetch_due = now + SEND_RETRY

    # ------------------------------------------------------------------ incoming
    def on_reply(self, frames: list[bytes]) -> None:
        reply = wire.decode_records(frames)
        if reply.ring != self.ring:
            self.adopt_ring(reply.ring)
            return
        if reply.ask != self.fetch_from:
            return  # a late answer to a FETCH already resent and answered
        if self.expect is None:
            self.expect = reply.start  # no cursor for this ring: start at its head
        elif reply.start > self.expect:
            log.error(
                "records %d..%d of fan-in ring %s were released before the store had them"
                " (is %r in NODE_DURABLE_SUBSCRIBERS?): continuing at %d",
                self.expect,
                reply.start,
                ring_name(self.ring),
                NAME,
                reply.start,
            )
            ERRORS.labels(stage="store", reason="released_gap").inc()
            STORE_GAPS.inc()
            self.expect = reply.start
            self.dirty = True
        if not reply.records:
            now = time.monotonic()
            if reply.tail < self.expect:
                log.error(
                    "store cursor %d is beyond the tail %d of fan-in ring %s (ring file replaced by an"
                    " older copy?): waiting for the ring to reach it",
                    self.expect,
                    reply.tail,
                    ring_name(self.ring),
                )
                ERRORS.labels(stage="store", reason="cursor_beyond_tail").inc()
            if now - self.fetch_sent_at >= QUICK_EMPTY:
                self.start_fetch()  # a long poll that timed out: poll again
            else:
                self.fetch_due = now + EMPTY_RETRY
            return
        # Ask for the next batch before decoding this one: the publisher reads it while
        # the store decodes and commits (reply.next is where these records end).
        self.start_fetch(reply.next)
        expect = self.expect
        pos = reply.start
        for end, payload in zip(reply.ends, reply.records, strict=False):
            if end > expect:
                self.take(pos, payload)
            pos = end
        if reply.next > expect:
            self.expect = reply.next
            self.dirty = True

    def take(self, pos: int, payload: bytes) -> None:
        try:
            record = unpack_record(payload)
        except RecordError as exc:
            log.error("fan-in ring %s position %d: %s: skipped", ring_name(self.ring), pos, exc)
            ERRORS.labels(stage="store", reason="bad_record").inc()
            return
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append(record)
        received_at = record.received_at
        if isinstance(received_at, (int, float)) and received_at > self.pending_newest:
            self.pending_newest = float(received_at)

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
        self.last_confirm = time.monotonic()  # also with nothing to confirm: the next try is due then
        if self.ring is None or self.durable is None:
            return
        try:
            self.dealer.send_multipart(wire.encode_confirm(NAME, self.ring, self.durable), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the publisher is away; confirmed again when it is back (or at the next wake-up)

    def watch_stop(self, stop: object) -> None:
        """Wake the poll when ``stop``'s signal arrives: an idle step may then block longer."""
        if register_stop(self.poller, stop):
            self.idle_poll = IDLE_POLL_WOKEN

    # ------------------------------------------------------------------ loop
    def drain(self) -> None:
        """Handle the queued answers (a few at most: one FETCH is outstanding); commit when due."""
        more = take_queued(
            self.dealer, DRAIN_BUDGET, self.on_reply,
            stage="store", what="publisher", log=log, full=lambda: len(self.pending) >= MAX_BATCH,
        )  # fmt: skip
        # Commit a full batch, or the records MAX_DELAY after the first of them: not
        # whenever the queue runs dry.  Each commit is an fdatasync (and a CONFIRM, so a
        # pop in the publisher); at 10k msg/s a commit per 5 ms-coalesced answer meant
        # 200 disk flushes a second competing with the web front's (docs/bench.md).
        if self.dirty and (
            len(self.pending) >= MAX_BATCH
            or time.monotonic() - self.pending_since >= MAX_DELAY
            or (not more and not self.pending)  # only the cursor moved (padding)
        ):
            self.commit()

    def step(self) -> None:
        self.reconnector.poll()
        now = time.monotonic()
        reconnected = self.reconnector.handshakes != self.handshakes
        if reconnected:
            self.handshakes = self.reconnector.handshakes
            if self.ring is not None:
                log.info("connected to the publisher again: FETCH from %s, CONFIRM resent", self.fetch_from)
                self.fetch_due = now  # a restarted publisher lost the parked FETCH
            self.last_confirm = 0.0  # ... and knows no cursor
        if now >= self.fetch_due:
            if self.ring is not None and not reconnected and now - self.fetch_sent_at >= FETCH_TIMEOUT:
                log.info("FETCH from %s unanswered for %.1fs: asking again", self.fetch_from, FETCH_TIMEOUT)
            self.start_fetch()
        if now - self.last_confirm >= CONFIRM_INTERVAL:
            self.confirm()  # not a timer of its own: an idle store wakes once per long poll
        timeout = max(0.0, min(self.idle_poll, self.fetch_due - now))
        if self.reconnector.retry_at is not None:  # a refused handshake is retried then
            timeout = max(0.0, min(timeout, self.reconnector.retry_at - now))
        if self.dirty:
            timeout = max(0.0, min(timeout, self.pending_since + MAX_DELAY - now))
        if self.poller.poll(int(timeout * 1000)):
            self.drain()
        elif self.dirty:
            self.commit()

    def close(self) -> None:
        self.commit()
        self.reconnector.close()
        self.dealer.close()
