"""``publisher`` stage: the single consumer of the fan-in ring.

* **Durable subscribers pull batches** -- a ROUTER (``settings.replay_endpoint``)
  answers ``FETCH`` with ``RECORDS``: every committed record from ``from`` on (up to
  ``max``), in three frames whatever the count (``node.wire``).  A FETCH with
  ``wait`` for which nothing is committed yet is **parked** (long poll): it is
  answered as soon as the doorbell reports new records, or empty after
  ``PARK_TIMEOUT`` so the subscriber learns that the publisher is alive (it resends
  an unanswered FETCH after its own, longer, timeout).  Only un-popped records
  exist: a ``from`` below the head is answered from the head.
* **Release** -- the ring is popped only up to the minimum cursor confirmed
  (``CONFIRM``) by every durable subscriber (``NODE_DURABLE_SUBSCRIBERS``, default
  ``store``), never before all of them confirmed: a stopped store makes the ring
  fill, which pushes back on the router, the monitor and the devices.
* **Live stream, for live subscribers only** -- an XPUB (``settings.pub_endpoint``)
  whose subscriptions the loop reads (:class:`TopicFilter`).  A record is published
  as ``[device topic, [ring_id, pos, end, epoch, n], envelope]`` only when some
  subscription matches its topic; with no subscriber (a node without client apps)
  the live stream reads and sends nothing per record.  ``n`` counts the messages
  published on the topic since this process started (``epoch`` is drawn at start),
  so a subscriber sees what the high-water mark (``NODE_PUB_HWM``) dropped.  A
  heartbeat ``[ring_id, published_position]`` every ``Settings.pub_heartbeat``.  When
  the first subscription arrives the live stream starts at the newest committed
  record (it skips what the durable subscribers have not read yet: no backlog for
  a client app).  The heartbeat interval is ``NODE_PUB_HEARTBEAT_MS`` (5 s); a
  new subscription gets one at once.

No spin: the loop blocks in ``zmq.Poller.poll``; a doorbell thread blocks in
``reader.wait`` (GIL released) and pokes an ``inproc://`` PAIR when records are
committed past what was read -- armed only while a FETCH is parked or a live
subscriber waits for records.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import zmq

from node import curve, wire
from node.config import Settings
from node.metrics import ERRORS, MESSAGES
from node.pipeline.doorbell import Doorbell
from node.pipeline.inbox import register_stop, take_queued
from node.pipeline.pacer import PopPacer
from node.record import RecordError, device_id_of
from node.ring.errors import RingCorrupt, RingError, RingPositionError

log = logging.getLogger("node.publisher")

READ_RECORDS = 256  # records per ring read / publish batch
READ_BYTES = 1 << 20
FETCH_MAX_RECORDS = 2048  # most records answered to one FETCH
FETCH_MAX_BYTES = 2 << 20
#: s: a parked FETCH is answered empty after this long (the store resends an unanswered
#: one after its FETCH_TIMEOUT, 8 s: keep this shorter).  An idle store and publisher
#: exchange one long poll per PARK_TIMEOUT (issue 16: it was 0.5 s).
PARK_TIMEOUT = 5.0
MAX_PARKED = 64  # parked FETCHes (one per peer); beyond, answered at once
IDLE_POLL = 0.2  # s: longest block in poll when a signal cannot wake it (bounds SIGTERM latency)
IDLE_POLL_WOKEN = 60.0  # s: the same once the stop fd is in the poller (watch_stop): no idle wake of its own
REPLAY_BUDGET = 64  # replay-socket messages handled per loop step
SUBSCRIPTION_BUDGET = 4096  # XPUB subscription messages handled per loop step
SKIP_READS = 16  # ring reads per loop step while the live stream skips to the newest
BAD_TOPIC = wire.device_topic("")  # a record whose envelope cannot be read still keeps its place
# Plain-int flags: send_multipart ORs enum flags per frame, a measurable share per record.
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


class TopicFilter:
    """The prefixes live subscribers hold, as an XPUB reports them (free of I/O).

    Without ``XPUB_VERBOSE`` libzmq reports a prefix once, when its first subscriber
    arrives, and its unsubscription once, when the last one leaves or disconnects:
    a set is exactly the state.  Device topics end in NUL, so they are matched by a
    set lookup; the empty prefix (``device=*``) matches everything; any other prefix
    (not made by the fanout) by ``startswith``.
    """

    def __init__(self) -> None:
        self.everything = False
        self.exact: set[bytes] = set()
        self.prefixes: set[bytes] = set()

    def __bool__(self) -> bool:
        return self.everything or bool(self.exact) or bool(self.prefixes)

    def update(self, sub: wire.Subscription) -> None:
        prefix = sub.prefix
        if prefix == b"":
            self.everything = sub.subscribe
        else:
            target = self.exact if prefix.endswith(wire.TOPIC_END) else self.prefixes
            if sub.subscribe:
                target.add(prefix)
            else:
                target.discard(prefix)

    def matches(self, topic: bytes) -> bool:
        if self.everything or topic in self.exact:
            return True
        return any(topic.startswith(p) for p in self.prefixes)


def bind_sockets(
    ctx: zmq.Context[zmq.Socket[bytes]], pub: zmq.Socket[bytes], replay: zmq.Socket[bytes], settings: Settings
) -> curve.ServerLink | None:
    """Bind the XPUB and the replay ROUTER; on ``tcp://`` (loopback included) both are CURVE
    servers behind one authenticator, accepting ``NODE_CURVE_SUBSCRIBERS_DIR`` and this
    node's own client key (``node.curve``); ``ipc://`` files are owner-only.  Raises
    :class:`ConfigError` (key files) or ``zmq.ZMQError`` (bind); nothing is left running then."""
    for sock in (pub, replay):  # a subscriber behind a dead link is dropped (its subscriptions too)
        sock.setsockopt(zmq.HEARTBEAT_IVL, curve.HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, curve.HEARTBEAT_TIMEOUT_MS)
    link = curve.secure_servers(
        ctx,
        [
            (pub, settings.pub_endpoint, "NODE_PUB_BIND"),
            (replay, settings.replay_endpoint, "NODE_REPLAY_BIND"),
        ],
        settings,
        "publisher",
        log,
        ("NODE_CURVE_SUBSCRIBERS_DIR", settings.curve_subscribers_dir),
        "store or fanout",
    )
    try:
        curve.bind(pub, settings.pub_endpoint)
        curve.bind(replay, settings.replay_endpoint)
    except zmq.ZMQError:
        if link is not None:
            link.stop()
        raise
    return link


class Publisher:
    def __init__(self, settings: Settings, ring: Any, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.ring = ring
        # FETCH/RECORDS/CONFIRM and the live stream name the ring by its incarnation
        # (ring id + epoch): a durable subscriber's cursor never crosses a recovery.
        self.ring_id: bytes = ring.incarnation
        self.reader = ring.reader()
        self.pacer = PopPacer(ring, self.reader)
        self.durable = tuple(settings.durable_subscribers)
        self.confirmed: dict[str, int] = {}
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.SNDHWM, settings.pub_hwm)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.replay = ctx.socket(zmq.ROUTER)
        self.replay.setsockopt(zmq.SNDHWM, 1000)
        self.replay.setsockopt(zmq.RCVHWM, 1000)
        self.replay.setsockopt(zmq.LINGER, 0)
        self.link = bind_sockets(ctx, self.pub, self.replay, settings)
        self.doorbell = Doorbell(ctx, self.reader, "publisher", settings.pipeline_coalesce)
        self.poller = zmq.Poller()
        self.poller.register(self.replay, zmq.POLLIN)
        self.poller.register(self.pub, zmq.POLLIN)
        self.poller.register(self.doorbell.inbox, zmq.POLLIN)
        self.idle_poll = IDLE_POLL
        self.topics = TopicFilter()
        self.epoch = int.from_bytes(os.urandom(6), "big")  # this process's live-stream counters
        self.counts: dict[bytes, int] = {}  # messages published per topic (n)
        self.parked: dict[bytes, tuple[wire.Fetch, float]] = {}  # peer identity -> (FETCH, deadline)
        self.published = ring.head  # the live stream's position (everything before it was offered)
        self.read_end = self.published  # highest record end read so far (a record boundary)
        self.last_heartbeat = 0.0
        self.heartbeat_interval = settings.pub_heartbeat
        self.catching_up = False  # the live stream skips to the newest records first
        self._read_cache: tuple[int, list[Any]] | None = None  # one step's read, shared

    def watch_stop(self, stop: object) -> None:
        """Wake the poll when ``stop``'s signal arrives: an idle step may then block longer."""
        if register_stop(self.poller, stop):
            self.idle_poll = IDLE_POLL_WOKEN

    # ------------------------------------------------------------------ ring reads
    def read(self, start: int, max_records: int, max_bytes: int) -> list[Any]:
        """Records from ``start``; a read of the same position in the same step is reused."""
        cache = self._read_cache
        if cache is not None and cache[0] == start and cache[1]:
            return cache[1][:max_records]
        records: list[Any] = self.reader.read(start, max_records=max_records, max_bytes=max_bytes)
        if records:
            self._read_cache = (start, records)
            read_end = self.read_end
            if records[-1].end > read_end:
                # stage="published": each record once, when first read (to be handed on)
                fresh = (
                    len(records) if records[0].end > read_end else sum(1 for r in records if r.end > read_end)
                )
                MESSAGES.labels(stage="published").inc(fresh)
                self.read_end = records[-1].end
        return records

    # ------------------------------------------------------------------ live stream
    def publish_some(self) -> int:
        """Publish the next batch of committed records to matching subscribers; returns how many were read."""
        head = self.ring.head
        if self.published < head:
            # A pop to the end of the last record before the wrap also releases the
            # padding after it once the reader scanned past it: the head can land
            # beyond the live position, with nothing but padding in between.
            self.published = head
        topics = self.topics
        if not topics:  # nobody listens: follow the durable subscribers' reads for free
            if self.read_end > self.published:
                self.published = self.read_end
            return 0
        if self.catching_up and not self.skip_to_newest():
            return READ_RECORDS  # more to skip: come back at once
        records = self.read(self.published, READ_RECORDS, READ_BYTES)
        if not records:
            return 0
        send = self.pub.send
        counts = self.counts
        ring_id, epoch = self.ring_id, self.epoch
        everything = topics.everything
        span = self.published
        for rec in records:
            try:
                topic = wire.device_topic(device_id_of(rec.payload))
            except RecordError as exc:
                log.error("fan-in ring position %d: %s: published under the empty topic", rec.pos, exc)
                ERRORS.labels(stage="publisher", reason="bad_record").inc()
                topic = BAD_TOPIC
            if everything or topics.matches(topic):
                n = counts.get(topic, 0) + 1
                counts[topic] = n
                send(topic, _MORE)
                send(wire.encode_meta(ring_id, span, rec.end, epoch, n), _MORE)
                send(rec.payload, _LAST)
            span = rec.end
        self.published = span
        return len(records)

    def skip_to_newest(self) -> bool:
        """Move the live position over committed records without publishing them (a first
        subscriber gets live records, not a backlog nobody consumed); True once there."""
        for _ in range(SKIP_READS):
            records = self.read(self.published, FETCH_MAX_RECORDS, FETCH_MAX_BYTES)
            if records:
                self.published = records[-1].end
            if len(records) < FETCH_MAX_RECORDS:
                self.catching_up = False
                self._read_cache = None
                return True
        return False

    def heartbeat(self) -> None:
        self.last_heartbeat = time.monotonic()
        self.pub.send_multipart(wire.encode_heartbeat(self.ring_id, self.published), zmq.NOBLOCK)

    def on_subscription(self, frame: bytes) -> None:
        sub = wire.decode_subscription(frame)
        had = bool(self.topics)
        self.topics.update(sub)
        if not sub.subscribe and not sub.prefix.endswith(wire.TOPIC_END):
            self._forget_counts()  # "everything" (or a foreign prefix) left
        if not had and self.topics:
            self.catching_up = True  # start at the newest records, not at what nobody read yet
        if sub.subscribe:
            self.last_heartbeat = 0.0  # the step's heartbeat tells the newcomer the position at once
        log.info(
            "live subscriber %s %r (%s)",
            "subscribed to" if sub.subscribe else "unsubscribed from",
            sub.prefix[:64],
            "everything"
            if self.topics.everything
            else f"{len(self.topics.exact) + len(self.topics.prefixes)} prefixes",
        )

    def _forget_counts(self) -> None:
        """Drop the counters of topics no remaining prefix matches (bounded memory once
        ``device=*`` leaves).  A device topic's own counter is kept when it is
        unsubscribed (one int per device ever followed), so a subscriber's numbers go on
        where they stopped; the fanout starts its check afresh anyway."""
        topics = self.topics
        if topics.everything:
            return
        if not topics.prefixes:
            self.counts = {t: n for t, n in self.counts.items() if t in topics.exact}
        else:
            self.counts = {t: n for t, n in self.counts.items() if topics.matches(t)}

    # ------------------------------------------------------------------ replay / confirm
    def on_replay(self, frames: list[bytes], now: float) -> None:
        if len(frames) < 2:
            raise wire.WireError(f"replay: expected identity + message, got {len(frames)} frames")
        identity, body = frames[0], frames[1:]
        if body[0] == wire.CONFIRM:
            self.on_confirm(wire.decode_confirm(body))
        elif body[0] == wire.FETCH:
            self.on_fetch(identity, wire.decode_fetch(body), now)
        else:
            raise wire.WireError(f"replay: unknown verb {body[0][:16]!r}")

    def on_fetch(self, identity: bytes, fetch: wire.Fetch, now: float) -> None:
        self.parked.pop(identity, None)  # a newer request replaces a parked one
        if not self.answer(identity, fetch, final=False):
            if len(self.parked) >= MAX_PARKED:
                self.answer(identity, fetch, final=True)
            else:
                self.parked[identity] = (fetch, now + PARK_TIMEOUT)

    def answer(self, identity: bytes, fetch: wire.Fetch, final: bool) -> bool:
        """Answer ``fetch`` with what is committed; with nothing to send and not ``final``,
        a waiting FETCH is left unanswered (``False``: park it)."""
        head = self.ring.head
        mine = fetch.ring == self.ring_id
        start = max(fetch.start, head) if mine else head
        count = max(0, min(fetch.max, FETCH_MAX_RECORDS))
        records: list[Any] = []
        if count:
            try:
                records = self.read(start, count, FETCH_MAX_BYTES)
            except RingCorrupt:
                raise  # damaged beyond live repair: stop, so that a restart recovers the ring
            except RingError as exc:  # not a record boundary, beyond the tail: a confused peer
                log.warning("FETCH from %d (head %d): %s: answered with no records", fetch.start, head, exc)
                ERRORS.labels(stage="publisher", reason="bad_fetch").inc()
                final = True
        if mine and fetch.start < start and self.reader.padding_only_before_head(fetch.start):
            # Popped to fetch.start, then only wrap padding after it (the reader releases
            # padding it has scanned): the answer goes on from where it was asked, so
            # the subscriber does not take the padding for released records (a false gap).
            start = fetch.start
        if not records and not final and fetch.wait and mine and count:
            return False
        ends = [rec.end for rec in records]
        reply = wire.encode_records(
            self.ring_id,
            start,
            ends[-1] if ends else start,
            self.ring.tail,
            ends,
            [rec.payload for rec in records],
            ask=fetch.start,
        )
        try:
            self.replay.send_multipart([identity, *reply], zmq.NOBLOCK)
        except zmq.Again:
            pass  # the subscriber is gone or flooded; it asks again after its timeout
        return True

    def serve_parked(self, now: float) -> None:
        for identity, (fetch, deadline) in list(self.parked.items()):
            if self.answer(identity, fetch, final=now >= deadline):
                del self.parked[identity]

    def on_confirm(self, confirm: wire.Confirm) -> None:
        if confirm.ring != self.ring_id:
            log.info("CONFIRM from %r for another ring %s ignored", confirm.name, confirm.ring.hex())
            return
        if confirm.name not in self.durable:
            return  # not a durable subscriber: its progress does not hold records
        if confirm.pos > self.ring.tail:
            log.error(
                "CONFIRM from %r at %d is beyond the ring tail %d: ignored",
                confirm.name,
                confirm.pos,
                self.ring.tail,
            )
            ERRORS.labels(stage="publisher", reason="bad_confirm").inc()
            return
        if confirm.pos > self.confirmed.get(confirm.name, -1):
            self.confirmed[confirm.name] = confirm.pos
            self.release()

    def release(self) -> None:
        """Pop up to the minimum cursor confirmed by every durable subscriber.

        Never past a position this reader has read (the ring's rule), nor, while live
        subscribers listen, past the live stream's position (the store pulls on its own
        and may be ahead: a popped record could no longer be published); a cursor
        beyond what this process has read (after a restart) is read up to here, a
        batch per call, and popped to in steps.
        """
        if len(self.confirmed) < len(self.durable):
            return
        confirmed = min(self.confirmed[name] for name in self.durable)
        if self.read_end < confirmed:
            # Restarted after the durable subscribers stored records this process never
            # read: nobody will FETCH them, so read them here (a batch per step) to be
            # allowed to pop them.  Waiting for new traffic instead deadlocks a full
            # ring: the router cannot append until something is popped.
            start = max(self.read_end, self.ring.head)
            try:
                self.read(start, FETCH_MAX_RECORDS, FETCH_MAX_BYTES)
            except RingError as exc:
                log.error("cannot read from %d towards the confirmed cursor %d: %s", start, confirmed, exc)
        target = min(confirmed, self.read_end)
        if self.topics and not self.catching_up:
            target = min(target, self.published)  # live subscribers get every record first
        if target <= self.ring.head:
            return
        if self.published < target:
            self.published = target  # already durable downstream: no need to publish it again
        self.pace(target)

    def pace(self, target: int | None = None, flush: bool = False) -> None:
        """Pop to ``target`` when the pacer says so (node/pipeline/pacer.py: pops are
        coalesced, each one persists the ring's head); ``flush``: pop what is pending now."""
        try:
            if flush:
                popped = self.pacer.flush()
            elif target is None:
                popped = self.pacer.poll()
            else:
                popped = self.pacer.want(target)
        except RingPositionError as exc:
            log.error("cannot pop to the confirmed cursor: %s", exc)
            ERRORS.labels(stage="publisher", reason="bad_confirm").inc()
            return
        if popped:
            self._read_cache = None

    # ------------------------------------------------------------------ loop
    def step(self) -> None:
        self._read_cache = None
        now = time.monotonic()
        if self.parked:
            self.serve_parked(now)
        n = self.publish_some()
        self.release()
        self.pace()  # a pop the pacer held back may be due (release() returns early when idle)
        live_waiting = bool(self.topics) and n < READ_RECORDS
        if self.parked or live_waiting:
            self.doorbell.arm()  # records committed past the last read wake the poll
        if now - self.last_heartbeat >= self.heartbeat_interval:
            self.heartbeat()
        timeout = min(self.idle_poll, max(0.0, self.last_heartbeat + self.heartbeat_interval - now))
        if self.parked:
            timeout = min(timeout, max(0.0, min(d for _, d in self.parked.values()) - now))
        pop_in = self.pacer.timeout(now)
        if pop_in is not None:
            timeout = min(timeout, pop_in + 0.001)
        if n >= READ_RECORDS:
            timeout = 0
        events = dict(self.poller.poll(int(timeout * 1000)))
        self._read_cache = None
        if self.doorbell.inbox in events:
            self.doorbell.drain()
        if self.pub in events:
            take_queued(
                self.pub, SUBSCRIPTION_BUDGET, self.on_subscription,
                stage="publisher", what="subscription", log=log, multipart=False,
            )  # fmt: skip
        if self.replay in events:
            now = time.monotonic()
            take_queued(
                self.replay, REPLAY_BUDGET, lambda frames: self.on_replay(frames, now),
                stage="publisher", what="replay", log=log,
            )  # fmt: skip

    def close(self) -> None:
        self.pace(flush=True)
        self.doorbell.close()
        self.pub.close()
        self.replay.close()
        if self.link is not None:
            self.link.stop()
