"""The client-app stream (contract 4): published records fanned out to WebSockets.

::

    publisher PUB ──► one SUB (topics: the devices followed by open clients)
                        │  Hub: decode, drop seq <= last streamed for the device,
                        │       JSON-encode once, offer the text to each follower
                        ▼
          per client: bounded queue (NODE_FANOUT_QUEUE) ──► its own sender task ──► WebSocket

* ``GET ws://HOST:NODE_FANOUT_PORT/v1/stream?device=ID[&device=ID2...]`` with a client
  token (``Authorization: Bearer`` or ``?token=``, see :mod:`node.auth`).
  ``device=*`` follows every device and needs a ``["*"]`` claim.  Refusals are HTTP
  answers at the handshake, never an upgrade: 401 (no/invalid/expired token), 403
  (a device outside the claim, a device token), 400 (no ``device`` parameter, an
  unusable id, more than :data:`MAX_DEVICES` ids).
* Node -> client: JSON text frames ``{"device", "seq", "ts", "received_at", "data"}``,
  in per-device order, each ``(device, seq)`` at most once per connection.
* A client more than ``NODE_FANOUT_QUEUE`` messages behind is closed with code 1013
  (try again later); it never holds up the SUB socket or the other clients.
* A device whose live stream has a gap (the publisher numbers the messages of each
  topic: ``n`` in the meta frame; the PUB/SUB high-water mark drops whole messages)
  closes every client following it with 1013 and a reason naming the device and
  how many messages were missed, instead of silently streaming around the hole.
* A stream ends with code 1008 when the ``exp`` of the token that opened it passes.
* The live stream is best effort: no replay of what the SUB high-water mark or a
  disconnection lost, but a loss is never silent (the gap rule above).  The store
  is the durable path (see ``docs/fanout.md``).

Subscriptions are reference-counted over clients: a device's topic is subscribed
when its first follower arrives and unsubscribed when its last one leaves.  The
gap check of a topic starts again at each (re)subscription, and whenever the
publisher's ``epoch`` changes (a restarted publisher numbers from 1 again).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Final

import zmq
import zmq.asyncio

from node import curve, wire
from node.auth import ALL_DEVICES, check_device_id, client_allows
from node.config import Settings
from node.errors import NodeError
from node.metrics import (
    ERRORS,
    FANOUT_DUPLICATES,
    FANOUT_GAP_CLIENT_DROPS,
    FANOUT_GAPS,
    FANOUT_MISSED_MESSAGES,
    FANOUT_SLOW_CLIENT_DROPS,
    MESSAGES,
)
from node.record import RecordError, unpack_record

log = logging.getLogger("node.fanout")

STREAM_PATH: Final = "/v1/stream"
MAX_DEVICES: Final = 1024  # device parameters per connection
CLOSE_TOO_SLOW: Final = 1013  # "try again later": too slow, or the live stream had a gap
CLOSE_TOKEN_EXPIRED: Final = 1008  # "policy violation": the token's exp has passed
CLOSE_GOING_AWAY: Final = 1001
MAX_BATCH: Final = 256  # SUB messages handled per wake-up (also bounded by half a client queue)
MAX_CLOSE_REASON_BYTES: Final = 123  # RFC 6455 5.5.1: a control frame body is <= 125 bytes
CLOSE_TIMEOUT: Final = 30.0  # seconds a close frame may wait behind a full socket

_json_encode = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, check_circular=False, separators=(",", ":")
).encode


class StreamRefused(NodeError):
    """A stream request refused at the handshake; ``status`` is the HTTP answer."""

    def __init__(self, status: int, reason: str, metric_reason: str) -> None:
        self.status = status
        self.reason = reason
        self.metric_reason = metric_reason
        super().__init__(f"{status}: {reason}")


def _shown(value: str, limit: int = 64) -> str:
    """``repr`` of a client-supplied value, cut short so a refusal stays small."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _close_reason(text: str) -> str:
    """``text`` cut to the 123 UTF-8 bytes a WebSocket close reason may hold."""
    data = text.encode()
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return text
    return data[: MAX_CLOSE_REASON_BYTES - 3].decode(errors="ignore") + "..."


# ------------------------------------------------------------------- what to follow
@dataclass(frozen=True)
class Selection:
    """The devices one client follows: ``everything`` or the ids in ``devices``."""

    everything: bool
    devices: frozenset[str]


def select_devices(requested: list[str], allowed: frozenset[str]) -> Selection:
    """Check the ``device`` parameters against the token's claim; refuse with the reason."""
    if not requested:
        raise StreamRefused(
            400,
            "no device requested: add ?device=ID (repeat it for several devices), "
            'or ?device=* with a token whose devices claim is ["*"]',
            "no_device",
        )
    if len(requested) > MAX_DEVICES:
        raise StreamRefused(
            400, f"{len(requested)} device parameters, the limit is {MAX_DEVICES}", "too_many_devices"
        )
    everything = False
    devices: set[str] = set()
    for device_id in requested:
        if device_id == ALL_DEVICES:
            if ALL_DEVICES not in allowed:
                raise StreamRefused(
                    403, 'device=* needs a token whose devices claim is ["*"]', "forbidden_device"
                )
            everything = True
            continue
        try:
            check_device_id(device_id)
        except ValueError as exc:
            raise StreamRefused(400, f"device={_shown(device_id)}: {exc}", "bad_device") from None
        if not client_allows(allowed, device_id):
            raise StreamRefused(
                403, f"device {_shown(device_id)} is not in the token's devices claim", "forbidden_device"
            )
        devices.add(device_id)
    return Selection(everything, frozenset() if everything else frozenset(devices))


# ------------------------------------------------------------------- one client
class Client:
    """The bounded queue between the hub and one WebSocket's sender task: at most
    ``limit`` messages and ``max_bytes`` characters of JSON (NODE_FANOUT_QUEUE,
    NODE_FANOUT_QUEUE_BYTES); the sender takes from it with :meth:`take`."""

    def __init__(self, selection: Selection, limit: int, max_bytes: int | None = None) -> None:
        self.selection = selection
        self.limit = limit
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self.queue: collections.deque[str] = collections.deque()
        self.overflowed = False
        self.overflow_reason = ""
        self.missed: str | None = None  # close reason once the live stream had a gap
        self.stopping = False
        self.expired = False
        self._wake = asyncio.Event()

    def offer(self, text: str) -> bool:
        """Queue ``text``; ``False`` (once) when the queue was full: the client is too slow."""
        if self.overflowed or self.stopping or self.missed is not None:
            return True  # already leaving; nothing more is queued
        if len(self.queue) >= self.limit:
            return self._overflow(f"too slow: more than {self.limit} messages queued")
        size = len(text)
        if self.max_bytes is not None and self.queued_bytes + size > self.max_bytes:
            return self._overflow(f"too slow: more than {self.max_bytes} bytes queued")
        self.queue.append(text)
        self.queued_bytes += size
        self._wake.set()
        return True

    def _overflow(self, reason: str) -> bool:
        self.overflowed = True
        self.overflow_reason = reason
        self.queue.clear()
        self.queued_bytes = 0
        self._wake.set()
        return False

    def take(self) -> str:
        """The oldest queued message (the queue must not be empty)."""
        text = self.queue.popleft()
        self.queued_bytes -= len(text)
        return text

    def stop(self) -> None:
        self.stopping = True
        self._wake.set()

    def lost(self, reason: str) -> None:
        """The live stream of a followed device had a gap: close with 1013 and ``reason``."""
        if self.missed is None and not self.overflowed:
            self.missed = reason
            self.queue.clear()
            self.queued_bytes = 0
            self._wake.set()

    def expire(self) -> None:
        self.expired = True
        self._wake.set()

    async def wait(self) -> None:
        await self._wake.wait()
        self._wake.clear()


# ------------------------------------------------------------------- the hub
class Hub:
    """Owns the SUB socket, the subscriptions and the clients; routes records to them."""

    @property
    def connected(self) -> bool:
        """A handshake with the publisher succeeded and the connection has not dropped since."""
        return self._reconnector.connected

    def __init__(self, endpoint: str, hwm: int, queue_limit: int, settings: Settings | None = None) -> None:
        self.endpoint = endpoint
        self.batch_max = max(1, min(MAX_BATCH, queue_limit // 2))
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        # Best effort by design: beyond this many unread messages libzmq drops (the
        # store's path is the durable one).  Same value as the publisher's PUB HWM.
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, curve.HEARTBEAT_IVL_MS)  # a dead link is noticed
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, curve.HEARTBEAT_TIMEOUT_MS)
        # On tcp:// a CURVE client of the publisher (``settings`` given: node.curve); a
        # refused handshake is retried by the Reconnector, polled by a small task.
        keypair = None
        if settings is not None:
            keypair = curve.secure_client(
                self._sock, settings, endpoint, settings.curve_publisher_key, "NODE_PUB_CONNECT", log
            )
        self._reconnector = curve.Reconnector(
            self._sock,
            endpoint,
            "publisher",
            curve.client_hint(keypair, "NODE_CURVE_SUBSCRIBERS_DIR", "NODE_CURVE_PUBLISHER_KEY"),
            "fanout",
            log,
        )
        self._reconnect_task: asyncio.Task[None] | None = None
        self._sock.connect(endpoint)
        self._sync: zmq.Socket[bytes] = zmq.Socket.shadow(self._sock.underlying)  # non-blocking drains
        self._topics: dict[bytes, int] = {}
        self._followers: dict[str, set[Client]] = {}
        self._everyone: set[Client] = set()
        self._clients: set[Client] = set()
        self._last_seq: dict[str, int] = {}
        self._epoch: int | None = None  # the publisher run whose counters _seen_n holds
        self._seen_n: dict[bytes, int] = {}  # topic -> the last message number received
        self._task: asyncio.Task[None] | None = None
        self._bad_logged_at = 0.0

    # --- subscriptions (reference-counted over clients)
    def _acquire(self, topic: bytes) -> None:
        count = self._topics.get(topic, 0)
        if count == 0:
            self._sock.setsockopt(zmq.SUBSCRIBE, topic)
            # The gap check starts again with the first message after a (re)subscription.
            if topic:
                self._seen_n.pop(topic, None)
            else:
                self._seen_n.clear()
        self._topics[topic] = count + 1

    def _release(self, topic: bytes) -> None:
        count = self._topics[topic] - 1
        if count == 0:
            del self._topics[topic]
            self._sock.setsockopt(zmq.UNSUBSCRIBE, topic)
        else:
            self._topics[topic] = count

    def add(self, client: Client) -> None:
        self._clients.add(client)
        if client.selection.everything:
            self._everyone.add(client)
            self._acquire(b"")
            return
        for device_id in client.selection.devices:
            self._followers.setdefault(device_id, set()).add(client)
            self._acquire(wire.device_topic(device_id))

    def remove(self, client: Client) -> None:
        """Forget ``client`` (idempotent) and drop subscriptions nobody holds any more."""
        if client not in self._clients:
            return
        self._clients.discard(client)
        if client.selection.everything:
            self._everyone.discard(client)
            self._release(b"")
            if not self._everyone:  # keep dedup state only for devices still followed
                self._last_seq = {d: s for d, s in self._last_seq.items() if d in self._followers}
                for topic in [t for t in self._seen_n if t not in self._topics]:
                    del self._seen_n[topic]  # in place: dispatch() holds this dict
            return
        for device_id in client.selection.devices:
            followers = self._followers[device_id]
            followers.discard(client)
            if not followers:
                del self._followers[device_id]
                if not self._everyone:
                    self._last_seq.pop(device_id, None)
                    self._seen_n.pop(wire.device_topic(device_id), None)
            self._release(wire.device_topic(device_id))

    # --- routing
    def dispatch(self, batch: Iterable[list[bytes]]) -> None:
        """Route one batch of SUB messages to the clients' queues (never raises on bad input)."""
        streamed = duplicates = bad = 0
        slow: list[Client] = []
        everyone = self._everyone
        seen_n = self._seen_n
        for frames in batch:
            if frames[0] == wire.HEARTBEAT_TOPIC:
                continue
            try:
                # [topic, meta, record] (wire.encode_published); of the meta only the
                # publisher's epoch and per-topic number n are used (the gap check).
                if len(frames) != 3:
                    raise wire.WireError(f"published record: expected 3 frames, got {len(frames)}")
                topic = frames[0]
                _, _, _, epoch, n = wire.decode_meta(frames[1])
                record = unpack_record(frames[2])
                if topic != wire.device_topic(record.device_id):
                    raise wire.WireError(
                        f"topic {topic[:64]!r} does not match the record's device {record.device_id[:64]!r}"
                    )
                followers = self._followers.get(record.device_id)
                if not followers and not everyone:
                    continue  # in flight before an unsubscribe took effect
                if epoch != self._epoch:  # first message, or a restarted publisher
                    self._epoch = epoch
                    seen_n.clear()
                last = seen_n.get(topic)
                seen_n[topic] = n
                if last is not None and n > last + 1:
                    self._gap(record.device_id, n - last - 1)
                    followers = self._followers.get(record.device_id)
                    if not followers and not everyone:
                        continue
                last = self._last_seq.get(record.device_id)
                if last is not None and record.seq <= last:
                    duplicates += 1
                    continue
                text = _json_encode(
                    {
                        "device": record.device_id,
                        "seq": record.seq,
                        "ts": record.ts,
                        "received_at": record.received_at,
                        "data": record.data,
                    }
                )
            except (wire.WireError, RecordError, TypeError, ValueError) as exc:
                bad += 1
                self._log_bad(exc)
                continue
            self._last_seq[record.device_id] = record.seq
            streamed += 1
            for client in chain(followers or (), everyone):
                if not client.offer(text):
                    slow.append(client)
        for client in slow:
            self.remove(client)
            log.warning(
                "client app too slow: more than %d messages queued, closing it with %d",
                client.limit,
                CLOSE_TOO_SLOW,
            )
        if slow:
            FANOUT_SLOW_CLIENT_DROPS.inc(len(slow))
        if streamed:
            MESSAGES.labels(stage="streamed").inc(streamed)
        if duplicates:
            FANOUT_DUPLICATES.inc(duplicates)
        if bad:
            ERRORS.labels(stage="fanout", reason="bad_message").inc(bad)

    def _gap(self, device_id: str, missed: int) -> None:
        """``missed`` live messages of ``device_id`` never arrived: close its followers."""
        victims = [*self._followers.get(device_id, ()), *self._everyone]
        reason = _close_reason(f"missed {missed} live messages of device {_shown(device_id, 48)}")
        for client in victims:
            client.lost(reason)
            self.remove(client)
        FANOUT_GAPS.inc()
        FANOUT_MISSED_MESSAGES.inc(missed)
        if victims:
            FANOUT_GAP_CLIENT_DROPS.inc(len(victims))
        log.warning(
            "live stream of device %s: %d messages missed (PUB/SUB high-water mark, NODE_PUB_HWM):"
            " closing its %d client(s) with %d",
            _shown(device_id),
            missed,
            len(victims),
            CLOSE_TOO_SLOW,
        )

    def _log_bad(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._bad_logged_at >= 1.0:  # at most one line a second
            self._bad_logged_at = now
            log.error("dropping a malformed published message (%s: %s)", type(exc).__name__, exc)

    # --- life cycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fanout-hub")
        self._reconnect_task = asyncio.get_running_loop().create_task(
            self._watch_handshakes(), name="fanout-handshakes"
        )
        log.info("subscribed to the publisher at %s", self.endpoint)

    async def _run(self) -> None:
        sock, sync, batch_max = self._sock, self._sync, self.batch_max
        while True:
            try:
                batch = [await sock.recv_multipart()]
                while len(batch) < batch_max:
                    try:
                        batch.append(sync.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                self.dispatch(batch)
            except (asyncio.CancelledError, zmq.ContextTerminated):
                raise
            except Exception:  # a bug must not silently end the stream for everyone
                log.exception("fanout hub: unexpected error, message dropped")
            await asyncio.sleep(0)  # let the clients' sender tasks drain their queues

    async def _watch_handshakes(self) -> None:
        """Read the SUB socket's handshake events when they come (and retry a refused
        handshake when due): no timer while connected (it polled 4 times a second)."""
        events = zmq.asyncio.Socket.shadow(self._reconnector.events.underlying)
        reconnector = self._reconnector
        try:
            while True:
                retry_at = reconnector.retry_at
                timeout = None if retry_at is None else max(0, int((retry_at - time.monotonic()) * 1000) + 1)
                await events.poll(timeout)
                reconnector.poll()
        finally:
            events.close()  # a shadow: only its reader on the loop goes (the reconnector closes the socket)

    async def close(self) -> None:
        for client in list(self._clients):
            client.stop()
            self.remove(client)
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            try:
                await self._reconnect_task
            except asyncio.CancelledError:
                pass
        self._reconnector.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, zmq.ContextTerminated):
                pass
        self._sync.close()
        self._sock.close(linger=0)
        self._ctx.term()
