"""``router`` stage: ROUTER socket -> fan-in ring, ack once durable.

Monitors (one per ingress ring, possibly on other nodes over tcp://) send
``BATCH`` messages on DEALER sockets.  For each batch the router appends the
records it has not appended yet to the fan-in ring -- one ``append_batch`` (one
persist) for everything received in the same loop turn -- and answers ``ACK``
with the batch's ``end`` once those records are durable.

Resends are deduplicated per source ring with :class:`Sources` (pure logic, no
I/O): the fan-in ring only ever receives each source's records contiguously and
in order; a batch that would leave a hole is dropped unacked (the monitor resends
from its oldest unacked batch).  See ``docs/monitor-router.md``.

Tunables (``NODE_ROUTER_GATHER_BATCHES``, ``NODE_ROUTER_GATHER_BYTES``,
``NODE_ROUTER_RCVHWM``) come from :class:`node.config.Settings`.

On a ``tcp://`` bind the ROUTER is a CURVE server (``node.curve``): only monitors
whose public key is in ``NODE_CURVE_CLIENTS_DIR`` (or this node's own) get a
connection; anyone else's handshake fails before a message reaches this loop.

When the fan-in ring is full the router stops reading its socket (ZeroMQ's
bounded queues fill, then the monitors' windows, then the ingress rings) and
retries the append with a short backoff; nothing is dropped.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from node import curve, wire
from node.config import Settings
from node.errors import ConfigError, NodeError
from node.metrics import ERRORS, MESSAGES
from node.pipeline.inbox import register_stop, socket_events

log = logging.getLogger("node.router")

# ZeroMQ send queue bound for acks, in messages (the receive bound is NODE_ROUTER_RCVHWM).
SNDHWM = 4096
POLL_MS = 200  # longest poll when a signal cannot wake it (a plain Event: tests)
IDLE_POLL_MS = 5000  # longest poll when the stop fd wakes it at SIGTERM
FULL_BACKOFF_MIN = 0.001
FULL_BACKOFF_MAX = 0.05
# Handshakes refused by the CURVE server itself (a peer without CURVE, or not knowing our
# public key); a refusal by the ZAP allow-list is logged by node.curve.  Logged at most
# this often, counted always.
HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
REFUSAL_LOG_INTERVAL = 60.0


class RouterError(NodeError):
    """The router cannot run; ``main`` exits with ``status`` (2: configuration/endpoint, 1: ring failure)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------- dedup, no I/O
class Sources:
    """Per source ring: the position before which everything is durable in the fan-in ring.

    ``accept`` decides which records of a batch to append.  The rule keeps the
    fan-in ring contiguous per source:

    * ``known = max(appended[ring], batch.base)``: everything before it is durable
      downstream (what this router appended, or what the monitor was acked for,
      possibly by an earlier router process);
    * ``batch.start > known`` leaves a hole (an earlier batch was lost in transit,
      or this router restarted and a later batch overtook the resend of an earlier
      one): refuse it, the monitor's resend fills the hole first;
    * otherwise append the records at positions ``>= known`` (a resend appends
      only its new part, possibly nothing) and ack ``batch.end``.
    """

    def __init__(self) -> None:
        self._appended: dict[bytes, int] = {}

    def accept(self, batch: wire.Batch) -> list[bytes] | None:
        """The records to append, in order, or ``None`` when the batch leaves a hole."""
        known = max(self._appended.get(batch.ring, batch.base), batch.base)
        if batch.start > known:
            return None
        if batch.end > known:
            self._appended[batch.ring] = batch.end
        return [rec for pos, rec in zip(batch.positions, batch.records, strict=False) if pos >= known]

    def known(self, ring: bytes) -> int | None:
        return self._appended.get(ring)

    def __len__(self) -> int:
        return len(self._appended)


# --------------------------------------------------------------------- pending appends
@dataclass
class Pending:
    """A batch waiting for its new records to be appended before it is acked."""

    identity: bytes
    ring: bytes
    end: int
    records: list[bytes] = field(default_factory=list)


def append_pending(ring: object, pending: deque[Pending]) -> tuple[int, list[Pending]]:
    """Append the records of ``pending`` in order with one ``append_batch``.

    Returns ``(records appended, entries now complete)``; complete entries are
    removed from ``pending`` in order, an entry partly appended keeps its tail.
    """
    flat = [rec for entry in pending for rec in entry.records]
    appended = ring.append_batch(flat) if flat else 0  # type: ignore[attr-defined]
    left = appended
    done: list[Pending] = []
    while pending:
        entry = pending[0]
        if len(entry.records) <= left:
            left -= len(entry.records)
            done.append(pending.popleft())
            continue
        del entry.records[:left]
        break
    return appended, done


# --------------------------------------------------------------------- sockets
def ensure_ipc_free(endpoint: str) -> None:
    """Refuse to bind over a live router; a stale socket file (SIGKILLed router) is fine.

    libzmq unlinks an existing ipc:// path at bind, which would silently steal the
    endpoint from a router that is still running.
    """
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://") :]
    if not Path(path).exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            log.info("removing stale socket file %s left by a previous router", path)
            return
        raise RouterError(f"cannot check ipc endpoint {endpoint}: {exc}") from None
    finally:
        probe.close()
    raise RouterError(f"another process is serving {endpoint} (is a router already running?)")


def bind_router(
    ctx: zmq.Context[zmq.Socket[bytes]], settings: Settings
) -> tuple[zmq.Socket[bytes], curve.ServerLink | None]:
    """The bound ROUTER and, on ``tcp://`` with CURVE, its running authenticator (stop it at exit)."""
    endpoint = settings.router_bind_endpoint
    ensure_ipc_free(endpoint)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, settings.router_rcvhwm)
    sock.setsockopt(zmq.SNDHWM, SNDHWM)
    try:
        link = curve.secure_server(ctx, sock, settings, endpoint, "NODE_ROUTER_BIND", "router", log)
    except ConfigError:
        sock.close()
        raise
    try:
        curve.bind(sock, endpoint)  # an ipc:// socket file only this user can connect to
    except zmq.ZMQError as exc:
        sock.close()
        if link is not None:
            link.stop()
        raise RouterError(f"cannot bind {endpoint} (NODE_ROUTER_BIND): {exc}") from None
    return sock, link


# --------------------------------------------------------------------- the stage
class Router:
    def __init__(self, settings: Settings, ring: object, sock: zmq.Socket[bytes]) -> None:
        self.settings = settings
        self.ring = ring
        self.sock = sock
        self.sources = Sources()
        self.pending: deque[Pending] = deque()
        self.full_since: float | None = None
        self.backoff = FULL_BACKOFF_MIN
        self.gaps = 0
        self.events: zmq.Socket[bytes] | None = None  # handshake failures, on a CURVE endpoint
        self.refusals = 0  # since the last log line
        self.refusal_logged_at: float | None = None

    def watch_handshakes(self) -> None:
        self.events = self.sock.get_monitor_socket(HANDSHAKE_FAILED)

    def take_events(self) -> None:
        assert self.events is not None
        for event in socket_events(self.events):
            if event["event"] & HANDSHAKE_FAILED:
                ERRORS.labels(stage="router", reason="handshake").inc()
                self.refusals += 1
        now = time.monotonic()
        if self.refusals and (
            self.refusal_logged_at is None or now - self.refusal_logged_at >= REFUSAL_LOG_INTERVAL
        ):
            log.warning(
                "refused %d connection handshakes on %s from peers without CURVE or without this router's"
                " public key (monitors need NODE_CURVE_SERVER_KEY = its curve_server.key)",
                self.refusals,
                self.settings.router_bind_endpoint,
            )
            self.refusals = 0
            self.refusal_logged_at = now

    def close(self) -> None:
        if self.events is not None:
            self.sock.disable_monitor()
            self.events.close(linger=0)

    def receive(self) -> None:
        """Take up to ``router_gather_batches`` waiting messages into ``pending`` (no blocking)."""
        size = 0
        for _ in range(self.settings.router_gather_batches):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            identity, body = frames[0], frames[1:]
            try:
                batch = wire.decode_batch(body)
            except wire.WireError as exc:
                ERRORS.labels(stage="router", reason="wire").inc()
                log.warning("dropping a malformed message from peer %s: %s", identity.hex(), exc)
                continue
            records = self.sources.accept(batch)
            if records is None:
                self.gaps += 1
                log.info(
                    "batch [%d, %d) of ring %s leaves a hole after %s: dropped, the monitor resends",
                    batch.start,
                    batch.end,
                    batch.ring.hex()[:8],
                    self.sources.known(batch.ring),
                )
                continue
            self.pending.append(Pending(identity, batch.ring, batch.end, records))
            size += sum(len(r) for r in records)
            if size >= self.settings.router_gather_bytes:
                return

    def flush(self) -> bool:
        """Append and ack what is pending; False while the fan-in ring is full."""
        if not self.pending:
            return True
        try:
            appended, done = append_pending(self.ring, self.pending)
        except ValueError as exc:  # RecordTooLarge: a fan-in ring smaller than a source ring
            raise RouterError(
                f"a record does not fit the fan-in ring ({exc}); NODE_FANIN_RING_BYTES="
                f"{self.settings.fanin_ring_bytes} must be >= every node's NODE_INGRESS_RING_BYTES"
            ) from None
        if appended:
            MESSAGES.labels(stage="routed").inc(appended)
        for entry in done:
            self.sock.send_multipart([entry.identity, *wire.encode_ack(entry.ring, entry.end)])
        if self.pending:
            if self.full_since is None:
                self.full_since = time.monotonic()
                log.warning("fan-in ring full: holding %d batches, not reading new ones", len(self.pending))
            return False
        if self.full_since is not None:
            log.warning("fan-in ring has room again after %.2fs", time.monotonic() - self.full_since)
            self.full_since = None
        self.backoff = FULL_BACKOFF_MIN
        return True

    def run(self, stop: object) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if self.events is not None:
            poller.register(self.events, zmq.POLLIN)
        longest = IDLE_POLL_MS if register_stop(poller, stop) else POLL_MS
        while not stop.is_set():  # type: ignore[attr-defined]
            if self.pending:
                if not self.flush():
                    stop.wait(self.backoff)  # type: ignore[attr-defined]
                    self.backoff = min(self.backoff * 2, FULL_BACKOFF_MAX)
                continue
            ready = dict(poller.poll(longest))
            if not ready:
                continue
            if self.events is not None and self.events in ready:
                self.take_events()
            if self.sock in ready:
                self.receive()
                self.flush()
