"""``monitor`` stage: ingress ring -> router, popping only what the router acked.

The monitor is the ingress ring's single consumer.  It reads batches (up to
``NODE_MONITOR_BATCH_RECORDS`` records / ``NODE_MONITOR_BATCH_BYTES``), sends
each as one ``BATCH`` multipart on a DEALER connected to the router, keeps up to
``NODE_MONITOR_WINDOW`` batches in flight, and pops the ring up to the highest
``end`` the router acked: a record leaves the ingress ring only once it is
durable in the fan-in ring.

Unacked batches are resent, oldest first and with the current ``base`` (the
acked-through position), when the connection to the router is (re)established
and when the oldest one has waited ``NODE_MONITOR_ACK_TIMEOUT`` seconds (doubling
up to ``NODE_MONITOR_ACK_TIMEOUT_MAX`` while nothing is acked).  The tunables
come from :class:`node.config.Settings`; see ``docs/monitor-router.md``.

On a ``tcp://`` endpoint the DEALER is a CURVE client (``node.curve``): its own
keypair from ``NODE_DATA_DIR`` and the router's public key from
``NODE_CURVE_SERVER_KEY`` (or, for this node's own router, from the data dir).

No spinning: the main loop blocks in ``zmq.Poller.poll``; while the ring is
empty a doorbell thread blocks in ``reader.wait`` (GIL released) and pokes an
``inproc://`` PAIR socket the poller watches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import zmq

from node import curve, wire
from node.config import Settings
from node.errors import NodeError
from node.metrics import ERRORS, MESSAGES
from node.pipeline.doorbell import Doorbell
from node.pipeline.inbox import register_stop, socket_events
from node.pipeline.pacer import PopPacer

log = logging.getLogger("node.monitor")

POLL_MS = 200  # longest poll when a signal cannot wake it (a plain Event: tests)
IDLE_POLL_MS = 5000  # longest poll when the stop fd wakes it at SIGTERM
HEARTBEAT_IVL_MS = 2000
HEARTBEAT_TIMEOUT_MS = 6000
# libzmq never reconnects after the peer refused the handshake (ZAP denial, mechanism
# mismatch): the monitor connects again itself this long after a refusal.
REFUSED_RETRY = 2.0
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
FINISH_WAIT = 1.0  # on SIGTERM, how long to collect acks of the batches in flight


class MonitorError(NodeError):
    """The monitor cannot run (ring unusable, consumer already present); exit non-zero."""


@dataclass
class Flight:
    """A batch sent (or to be sent) to the router and not yet acked."""

    start: int
    end: int
    positions: list[int]
    records: list[bytes]
    sent_at: float | None = None  # None: not sent on the current connection


class Window:
    """The batches in flight, oldest first, and the ack bookkeeping (no I/O)."""

    def __init__(self, ring_id: bytes, base: int, size: int = Settings.monitor_window) -> None:
        self.ring_id = ring_id
        self.base = base  # everything before it is acked (durable in the fan-in ring)
        self.read_pos = base  # where the next batch starts
        self.size = size
        self.flights: deque[Flight] = deque()

    @property
    def full(self) -> bool:
        return len(self.flights) >= self.size

    def add(self, positions: list[int], end: int, records: list[bytes]) -> Flight:
        flight = Flight(self.read_pos, end, positions, records)
        self.flights.append(flight)
        self.read_pos = end
        return flight

    def skip_to(self, head: int) -> None:
        """The ring released padding past our read position (only when nothing is in flight)."""
        if not self.flights and head > self.read_pos:
            self.read_pos = self.base = head

    def frames(self, flight: Flight) -> list[bytes]:
        return wire.encode_batch(
            self.ring_id, flight.positions, flight.end, flight.records, start=flight.start, base=self.base
        )

    def ack(self, ack: wire.Ack) -> int:
        """Apply a (cumulative) ack; return how many records it newly acknowledged."""
        if ack.ring != self.ring_id:
            raise wire.WireError(f"ACK for ring {ack.ring.hex()}, expected {self.ring_id.hex()}")
        if ack.end > self.read_pos:
            raise wire.WireError(f"ACK up to {ack.end}, beyond what was sent ({self.read_pos})")
        if ack.end > self.base and all(f.end != ack.end for f in self.flights):
            raise wire.WireError(f"ACK up to {ack.end}: not the end of a batch in flight")
        count = 0
        while self.flights and self.flights[0].end <= ack.end:
            count += len(self.flights.popleft().records)
        if ack.end > self.base:
            self.base = ack.end
        return count

    def oldest_sent(self) -> float | None:
        return self.flights[0].sent_at if self.flights else None


class Monitor:
    def __init__(
        self, ring: object, reader: object, ctx: zmq.Context[zmq.Socket[bytes]], settings: Settings
    ) -> None:
        self.ring = ring
        self.reader = reader
        self.endpoint = settings.router_connect_endpoint
        self.batch_records = settings.monitor_batch_records
        self.batch_bytes = settings.monitor_batch_bytes
        self.ack_timeout = settings.monitor_ack_timeout
        self.ack_timeout_max = settings.monitor_ack_timeout_max
        self.coalesce = settings.pipeline_coalesce
        # keyed by the ring's incarnation: a recovered ring is a new source for the router
        self.window = Window(ring.incarnation, ring.head, settings.monitor_window)  # type: ignore[attr-defined]
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # Queue only on a live connection: a reconnect starts with an empty pipe and
        # this loop resends from the oldest unacked batch (no stale copies overtaking).
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.SNDHWM, 2 * self.window.size + 2)
        self.sock.setsockopt(zmq.RCVHWM, 1000)
        # ZMTP heartbeats: a router that vanished without closing (host down, half-open
        # tcp://) drops the connection after HEARTBEAT_TIMEOUT, which triggers the resend.
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.events = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED
        )
        self.keypair = curve.secure_client(
            self.sock, settings, self.endpoint, settings.curve_server_key, "NODE_ROUTER_CONNECT", log
        )
        self.sock.connect(self.endpoint)
        self.connected = False
        self.refused = False  # the last handshake failed (logged once until one succeeds)
        self.retry_at: float | None = None  # connect again then (after a refused handshake)
        self.timeout = self.ack_timeout
        self.next_resend = 0.0
        # pops (a persist each) are coalesced: node/pipeline/pacer.py
        self.pacer = PopPacer(ring, reader)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- sending
    def send(self, flight: Flight) -> bool:
        try:
            self.sock.send_multipart(self.window.frames(flight), zmq.NOBLOCK)
        except zmq.Again:  # no live connection (IMMEDIATE) or HWM: sent on (re)connect/timeout
            flight.sent_at = None
            return False
        flight.sent_at = time.monotonic()
        return True

    def resend_all(self) -> int:
        sent = 0
        for flight in self.window.flights:
            if not self.send(flight):
                break
            sent += 1
        return sent

    def fill(self) -> bool:
        """Read and send new batches while the window has room; True if the ring ran dry."""
        while not self.window.full:
            # The ring may move its head past padding that follows the last popped
            # record; reading below the head would be refused.
            self.window.skip_to(self.ring.head)  # type: ignore[attr-defined]
            records = self.reader.read(  # type: ignore[attr-defined]
                self.window.read_pos, max_records=self.batch_records, max_bytes=self.batch_bytes
            )
            if not records:
                return True
            flight = self.window.add([r.pos for r in records], records[-1].end, [r.payload for r in records])
            # Never let a new batch overtake an unsent older one (the router would refuse it).
            if all(f.sent_at is not None for f in list(self.window.flights)[:-1]):
                self.send(flight)
        return False

    # ---------------------------------------------------------------- receiving
    def take_acks(self) -> None:
        acked = 0
        before = self.window.base
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                acked += self.window.ack(wire.decode_ack(frames))
            except wire.WireError as exc:
                ERRORS.labels(stage="monitor", reason="wire").inc()
                log.warning("ignoring a reply from the router: %s", exc)
        if self.window.base > before:
            self.pacer.want(self.window.base)
            MESSAGES.labels(stage="forwarded").inc(acked)
            if self.timeout != self.ack_timeout:
                log.info("router acks again (acked through %d)", self.window.base)
            self.timeout = self.ack_timeout
            # Restart the clock of what remains: it was waiting behind what was acked.
            now = time.monotonic()
            for flight in self.window.flights:
                if flight.sent_at is not None:
                    flight.sent_at = max(flight.sent_at, now - self.ack_timeout / 2)

    def take_events(self) -> None:
        for event in socket_events(self.events):
            if event["event"] & HANDSHAKE_FAILED:
                ERRORS.labels(stage="monitor", reason="handshake").inc()
                if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # libzmq retries the others itself
                    self.retry_at = time.monotonic() + REFUSED_RETRY
                if not self.refused:
                    self.refused = True
                    log.error(
                        "the router at %s refused the connection handshake (%s): %s; retrying",
                        self.endpoint,
                        zmq.Event(event["event"]).name,
                        self.handshake_hint(),
                    )
                continue
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.refused = False
                self.connected = True
                sent = self.resend_all()
                log.info("connected to the router at %s; sent %d unacked batches", self.endpoint, sent)
            elif event["event"] == zmq.EVENT_DISCONNECTED and (self.connected or not self.refused):
                self.connected = False
                for flight in self.window.flights:
                    flight.sent_at = None
                log.warning(
                    "disconnected from the router at %s (%d batches unacked)",
                    self.endpoint,
                    len(self.window.flights),
                )

    def check_refused(self) -> None:
        """Connect again ``REFUSED_RETRY`` s after a refused handshake (until the router lists our key)."""
        if self.retry_at is None or time.monotonic() < self.retry_at:
            return
        self.retry_at = None
        curve.reconnect(self.sock, self.endpoint)

    def handshake_hint(self) -> str:
        if self.keypair is None:
            return "is the router using CURVE (NODE_CURVE must be the same on both sides)?"
        return (
            f"the router must list this monitor's public key {self.keypair.public_path} (fingerprint"
            f" {self.keypair.fingerprint}) in its NODE_CURVE_CLIENTS_DIR, and NODE_CURVE_SERVER_KEY must be"
            " the router's curve_server.key"
        )

    def check_timeout(self) -> None:
        if not self.window.flights:
            return
        now = time.monotonic()
        oldest = self.window.oldest_sent()
        if now < self.next_resend or (oldest is not None and now - oldest < self.timeout):
            return
        if oldest is None and not self.connected:
            return  # nothing sent on this connection: the handshake event sends
        sent = self.resend_all()
        self.next_resend = now + self.timeout
        log.warning(
            "no ack from the router for %.1fs: resent %d of %d unacked batches from position %d",
            self.timeout,
            sent,
            len(self.window.flights),
            self.window.base,
        )
        self.timeout = min(self.timeout * 2, self.ack_timeout_max)

    def poll_ms(self, longest: int = POLL_MS) -> int:
        """Until the oldest batch's ack timeout or a refused handshake's retry, at most ``longest``."""
        due = [] if self.retry_at is None else [self.retry_at]
        oldest = self.window.oldest_sent()
        if oldest is not None:
            due.append(oldest + self.timeout)
        now = time.monotonic()
        pop_in = self.pacer.timeout(now)
        if pop_in is not None:
            due.append(now + pop_in)
        if not due:
            return longest
        return max(1, min(longest, int((min(due) - now) * 1000) + 1))

    # ---------------------------------------------------------------- loop
    def run(self, stop: threading.Event) -> None:
        doorbell = Doorbell(self.sock.context, self.reader, "monitor", self.coalesce)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.events, zmq.POLLIN)
        poller.register(doorbell.inbox, zmq.POLLIN)
        longest = IDLE_POLL_MS if register_stop(poller, stop) else POLL_MS
        try:
            while not stop.is_set():
                if not doorbell.armed and self.fill():
                    doorbell.arm()
                ready = dict(poller.poll(self.poll_ms(longest)))
                if self.events in ready:
                    self.take_events()
                if self.sock in ready:
                    self.take_acks()
                if doorbell.inbox in ready:
                    doorbell.drain()
                self.check_timeout()
                self.check_refused()
                self.pacer.poll()
            self.finish(FINISH_WAIT)
        finally:
            doorbell.close()

    def finish(self, timeout: float) -> None:
        """On stop: read nothing new, collect acks of what is in flight for up to ``timeout`` s.

        Not needed for safety (unacked records stay in the ring and are resent at
        the next start) but it saves the next router from appending them twice.
        """
        deadline = time.monotonic() + timeout
        while self.window.flights and self.connected:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                break
            self.take_acks()
        self.pacer.flush()

    def close(self) -> None:
        self.sock.disable_monitor()
        self.events.close(linger=0)
        self.sock.close(linger=0)
