"""Group commit: one committer per web worker, acks only after the ring persisted.

Every connection of a worker hands its accepted records to the worker's single
:class:`Committer`.  The committer takes everything queued so far as one *group*,
appends it with ONE ``ring.append_batch`` (one persist), and only then acks: per
connection, one cumulative ack per group, ``{"ack": N}`` in the encoding of the last
acked message.  While a group persists (in one dedicated thread: the ring's C call
releases the GIL, an msync takes 100+ microseconds), the event loop keeps reading
frames, and they form the next group.  Under light load a group is one message
(lowest latency); under heavy load groups grow by themselves (fewer persists).

Guarantees:

* an ack never precedes the persist of what it covers;
* per connection, records enter the ring in receipt order, and acks grow;
* ``N`` is the largest value such that every message this connection sent with
  ``seq <= N`` is durable (a device that resends a lower ``seq`` on the same
  connection gets no ack claiming a still-pending message).

Back-pressure, nothing dropped, memory bounded:

* a full ring (``append_batch`` returns fewer than asked) is retried with a short
  backoff (0.5 ms doubling to 10 ms); what was appended is acked at once;
* each connection may have at most ``window`` messages not yet durable (plus error
  replies not yet written); the committer at most ``max_pending_bytes`` of records
  queued or persisting.  When either is reached, :meth:`Committer.wait_room` blocks
  the connection's reader, so it stops reading its socket: TCP back-pressure.

Seams for metrics (``node.metrics`` plugs in here, the committer imports nothing
of it): :class:`FrontStats` holds the counts, and an optional
``on_group(now, receive_times, nbytes)`` callback sees every committed group with
the ``time.perf_counter()`` receive time of each message in it (ack latency =
``now - t``).

Public API::

    committer = Committer(ring, max_pending_bytes=..., window=..., threaded=True,
                          on_group=None, stats=None, interval=0.0)
    await committer.start();  await committer.stop()
    conn = committer.connect(device_id)           # one per WebSocket
    await committer.wait_room(conn)               # before reading the next frame
    committer.submit(conn, seq, binary, payload, t_received)
    conn.reply(frame)                             # an error reply to send in order with acks
    frames = await conn.outgoing()                # the connection's writer: what to send next
    committer.disconnect(conn)

Or, for a connection on the direct lane (node/directlane.py: no writer task), a
synchronous callback instead of the writer's events::

    conn.on_ready = callback    # called when frames are due, room may be back, or it failed/closes
    frames = conn.take()        # in the callback: what to send now (replies, then the ack)
    committer.notify_room(conn) # reader paused for room: call on_ready when the worker's
                                # pending bytes drop (its own window frees through on_ready anyway)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from node.protocol import encode_ack

__all__ = ["Appender", "Committer", "Conn", "FrontStats", "GroupCallback"]

log = logging.getLogger("iotnode.committer")

#: A group never exceeds these (bounds one append call and one persist).
MAX_GROUP_RECORDS = 4096
MAX_GROUP_BYTES = 4 << 20
_BACKOFF_FIRST = 0.0005
_BACKOFF_MAX = 0.010
_FULL_SLICE = 0.050  # the thread gives the loop a turn at least this often when full
#: The commit interval applies only after a group smaller than this: a larger one already
#: shares its persist among enough records (and a closed loop's acks should not wait).
SMALL_GROUP = 32


class Appender(Protocol):
    """What the committer needs of the ring (``node.ring.Ring`` satisfies it)."""

    def append_batch(self, payloads: list[bytes]) -> int: ...


GroupCallback = Callable[[float, Sequence[float], int], None]


@dataclass
class FrontStats:
    """Counts of one web worker, read by the metrics module."""

    received: int = 0  # accepted messages handed to the committer
    acked: int = 0  # messages made durable (and acked, unless the connection had gone)
    groups: int = 0  # append_batch calls that appended something
    ring_full: int = 0  # append_batch calls that appended less than asked
    errors: Counter[str] = field(default_factory=Counter)  # error replies by protocol kind
    refused: Counter[int] = field(default_factory=Counter)  # refused handshakes by HTTP status
    open_connections: int = 0
    pending_bytes: int = 0  # queued or persisting right now
    append_seconds: float = 0.0  # total wall time of append_batch calls (persist included)
    append_max_seconds: float = 0.0  # the slowest one
    paused: int = 0  # times a connection's reader waited for room (back-pressure)
    paused_seconds: float = 0.0  # total time readers spent waiting for room
    direct: int = 0  # connections served on the direct lane (node/directlane.py) so far


class Conn:
    """The committer's state for one device connection."""

    __slots__ = (
        "device_id",
        "_window",
        "_inflight",
        "_monotonic",
        "_last_seq",
        "_max_durable",
        "_ack",
        "_ack_max",
        "_ack_binary",
        "_replies",
        "_wake",
        "_room",
        "closed",
        "failed",
        "closing",
        "on_ready",
    )

    def __init__(self, device_id: str, window: int) -> None:
        self.device_id = device_id
        self._window = window
        self._inflight: deque[int] = deque()  # seqs handed over, not yet durable, receipt order
        self._monotonic = True  # every seq so far was above the previous one
        self._last_seq = -1
        self._max_durable = -1
        self._ack: int | None = None  # ack waiting for the writer (coalesced)
        self._ack_max = -1  # highest ack handed to the writer so far
        self._ack_binary = True
        self._replies: deque[bytes | str] = deque()
        self._wake = asyncio.Event()  # the writer has something to send
        self._room = asyncio.Event()  # the window has room again
        self.closed = False
        self.failed = False  # the committer could not persist: close with 1011
        self.closing = False  # the writer closes once nothing is in flight (session taken over)
        # The direct lane's callback (called synchronously instead of waking a writer task).
        self.on_ready: Callable[[], None] | None = None

    @property
    def unacked(self) -> int:
        return len(self._inflight)

    def has_room(self) -> bool:
        return len(self._inflight) + len(self._replies) < self._window

    def reply(self, frame: bytes | str) -> None:
        """Queue an error reply; it counts against the window until written."""
        self._replies.append(frame)
        if self.on_ready is not None:
            self._ready()
        else:
            self._wake.set()

    def close_when_settled(self) -> None:
        """Make :meth:`outgoing` return once nothing is in flight (after the last ack),
        so the writer can close the connection (a newer session took over)."""
        self.closing = True
        if self.on_ready is not None:
            self._ready()
        else:
            self._wake.set()

    def take(self) -> list[bytes | str]:
        """Every frame due to this device now (replies, then the ack); the direct lane's
        :meth:`outgoing`, without waiting."""
        frames: list[bytes | str] = []
        if self._replies:
            frames.extend(self._replies)
            self._replies.clear()
        if self._ack is not None:
            frames.append(encode_ack(self._ack, self._ack_binary))
            self._ack = None
        return frames

    def _ready(self) -> None:
        callback = self.on_ready
        if callback is not None:
            try:
                callback()
            except Exception:  # the connection's bug must not stop the committer's acks
                log.exception("committer: the on_ready callback of %r failed", self.device_id)

    async def outgoing(self) -> list[bytes | str]:
        """Wait for, then take, every frame due to this device (replies, then the ack);
        with :attr:`closing`, also return (maybe nothing) once nothing is in flight."""
        while (
            not self._replies
            and self._ack is None
            and not self.failed
            and not (self.closing and not self._inflight)
        ):
            self._wake.clear()
            await self._wake.wait()
        frames: list[bytes | str] = list(self._replies)
        self._replies.clear()
        if self._ack is not None:
            frames.append(encode_ack(self._ack, self._ack_binary))
            self._ack = None
        self._room.set()
        return frames

    # --- committer side -------------------------------------------------------
    def _handed(self, seq: int) -> None:
        if seq <= self._last_seq:
            self._monotonic = False
        self._last_seq = seq
        self._inflight.append(seq)

    def _durable(self, count: int, max_seq: int, binary: bool) -> None:
        inflight = self._inflight
        for _ in range(count):
            inflight.popleft()
        if max_seq > self._max_durable:
            self._max_durable = max_seq
        n = self._max_durable
        if not self._monotonic and inflight:
            n = min(n, min(inflight) - 1)
        if n >= 0 and n >= self._ack_max:  # acks never go down (a lower one is true but confusing)
            self._ack_max = n
            self._ack = n
            self._ack_binary = binary
            if self.on_ready is None:
                self._wake.set()
        if self.on_ready is not None:
            self._ready()  # the ack (if any) is written now, the window may have room again
        else:
            self._room.set()


class _Entry:
    __slots__ = ("conn", "seq", "binary", "payload", "t_received")

    def __init__(self, conn: Conn, seq: int, binary: bool, payload: bytes, t_received: float) -> None:
        self.conn = conn
        self.seq = seq
        self.binary = binary
        self.payload = payload
        self.t_received = t_received


class Committer:
    """Collects records from all connections of a worker; one append per group."""

    def __init__(
        self,
        ring: Appender,
        *,
        max_pending_bytes: int,
        window: int,
        threaded: bool = True,
        on_group: GroupCallback | None = None,
        stats: FrontStats | None = None,
        interval: float = 0.0,
    ) -> None:
        if max_pending_bytes < 1 or window < 1:
            raise ValueError(
                f"expected max_pending_bytes >= 1 and window >= 1, got {max_pending_bytes}, {window}"
            )
        if not 0.0 <= interval <= 0.1:
            raise ValueError(f"interval must be between 0 and 0.1 seconds, got {interval!r}")
        self._interval = interval
        self._ring = ring
        self._max_pending = max_pending_bytes
        self._window = window
        self._threaded = threaded
        self.on_group = on_group
        self.stats = stats or FrontStats()
        self._queue: deque[_Entry] = deque()
        self._conns: set[Conn] = set()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._room_waiters: set[Conn] = set()  # direct-lane connections paused for pending bytes
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self._threaded:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iotnode-commit")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="iotnode-committer")

    async def stop(self, timeout: float = 5.0) -> None:
        """Persist what is queued (bounded by ``timeout``), then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:
                log.warning(
                    "committer: %d records not persisted at shutdown (devices resend them)", len(self._queue)
                )
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        st = self.stats
        log.info(
            "committer: %d records acked in %d groups (%.1f per group); append_batch %.3f s total, %.1f ms "
            "max;"
            " ring full %d times",
            st.acked,
            st.groups,
            st.acked / max(st.groups, 1),
            st.append_seconds,
            st.append_max_seconds * 1e3,
            st.ring_full,
        )

    # ------------------------------------------------------------- connections
    def connect(self, device_id: str) -> Conn:
        conn = Conn(device_id, self._window)
        self._conns.add(conn)
        self.stats.open_connections += 1
        return conn

    def disconnect(self, conn: Conn) -> None:
        """Forget ``conn``.  Its queued records are still persisted (not acked)."""
        if not conn.closed:
            conn.closed = True
            self._conns.discard(conn)
            self.stats.open_connections -= 1

    def has_room(self, conn: Conn) -> bool:
        return conn.has_room() and self.stats.pending_bytes < self._max_pending

    async def wait_room(self, conn: Conn) -> None:
        """Return when ``conn`` may read its next frame (window and pending bytes),
        or when it failed (check ``conn.failed``)."""
        t0 = 0.0  # only the slow path (a real wait) is timed, for the back-pressure metrics
        while not conn.failed:
            if not conn.has_room():
                t0 = t0 or time.perf_counter()
                conn._room.clear()
                await conn._room.wait()
            elif self.stats.pending_bytes >= self._max_pending:
                t0 = t0 or time.perf_counter()
                self._room.clear()
                await self._room.wait()
            else:
                break
        if t0:
            self.stats.paused += 1
            self.stats.paused_seconds += time.perf_counter() - t0

    def notify_room(self, conn: Conn) -> None:
        """For a direct-lane connection whose reader paused (``has_room`` was false):
        make sure ``conn.on_ready`` runs once the worker's pending bytes are below the
        limit again.  Its own window frees in a completed group, which calls
        ``on_ready`` anyway."""
        if self.stats.pending_bytes >= self._max_pending:
            self._room_waiters.add(conn)

    def _wake_room_waiters(self) -> None:
        waiters = self._room_waiters
        if waiters:
            self._room_waiters = set()
            for conn in waiters:
                conn._ready()

    def submit(self, conn: Conn, seq: int, binary: bool, payload: bytes, t_received: float) -> None:
        """Queue one accepted record for the next group (never blocks: the reader
        called :meth:`wait_room` before reading the frame).  Ignored for a failed
        connection: it is being closed with 1011 and its device resends."""
        if conn.failed:
            return
        self._queue.append(_Entry(conn, seq, binary, payload, t_received))
        conn._handed(seq)
        self.stats.received += 1
        self.stats.pending_bytes += len(payload)
        self._wake.set()

    # ------------------------------------------------------------- the loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        interval = self._interval
        last_start = -1.0  # perf_counter of the last group's persist start
        last_size = 0  # records in the last group
        while True:
            if not queue:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if interval and last_size < SMALL_GROUP and not self._stopping:
                # Records are flowing in small groups (the last persist started less than
                # ``interval`` ago): let more arrive, so the group is one persist for several
                # of them.  A lone record, a persist that took ``interval`` already, or groups
                # large enough to amortise their persist (a closed loop) go at once.
                wait = last_start + interval - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            group = self._take()
            payloads = [e.payload for e in group]
            t0 = time.perf_counter()
            last_start, last_size = t0, len(group)
            try:
                if self._executor is not None:
                    n = await loop.run_in_executor(self._executor, self._append_blocking, payloads)
                else:
                    n = await self._append_inline(payloads)
            except Exception:
                # Not a full ring (that is a return value): the ring is broken or
                # misused.  Nothing of this group is acked; its connections are
                # closed with 1011 and their devices will resend.
                log.exception("committer: append_batch failed for %d records", len(group))
                self._fail(group)
                continue
            elapsed = time.perf_counter() - t0
            self.stats.append_seconds += elapsed
            if elapsed > self.stats.append_max_seconds:
                self.stats.append_max_seconds = elapsed
            if n < len(group):
                queue.extendleft(reversed(group[n:]))  # keep receipt order
            if n:
                self._complete(group[:n])

    def _take(self) -> list[_Entry]:
        queue = self._queue
        group: list[_Entry] = []
        size = 0
        while queue and len(group) < MAX_GROUP_RECORDS:
            entry = queue[0]
            if group and size + len(entry.payload) > MAX_GROUP_BYTES:
                break
            queue.popleft()
            group.append(entry)
            size += len(entry.payload)
        return group

    def _append_blocking(self, payloads: list[bytes]) -> int:
        """In the commit thread: append, retrying a full ring with backoff for a
        bounded slice, so the loop regains control at least every 50 ms."""
        deadline = time.monotonic() + _FULL_SLICE
        backoff = _BACKOFF_FIRST
        while True:
            n = self._ring.append_batch(payloads)
            if n < len(payloads):
                self.stats.ring_full += 1
            if n or time.monotonic() >= deadline:
                return n
            time.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _append_inline(self, payloads: list[bytes]) -> int:
        backoff = _BACKOFF_FIRST
        while True:
            n = self._ring.append_batch(payloads)
            if n < len(payloads):
                self.stats.ring_full += 1
            if n:
                return n
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _complete(self, done: list[_Entry]) -> None:
        now = time.perf_counter()
        nbytes = 0
        per_conn: dict[Conn, list[int]] = {}  # conn -> [count, max_seq, last binary]
        for e in done:
            nbytes += len(e.payload)
            acc = per_conn.get(e.conn)
            if acc is None:
                per_conn[e.conn] = [1, e.seq, e.binary]
            else:
                acc[0] += 1
                if e.seq > acc[1]:
                    acc[1] = e.seq
                acc[2] = e.binary
        stats = self.stats
        stats.acked += len(done)
        stats.groups += 1
        stats.pending_bytes -= nbytes  # before the acks: a direct lane's on_ready sees the room
        for conn, (count, max_seq, binary) in per_conn.items():
            conn._durable(count, max_seq, bool(binary))
        if stats.pending_bytes < self._max_pending:
            self._room.set()
            self._wake_room_waiters()
        if self.on_group is not None:
            try:
                self.on_group(now, [e.t_received for e in done], nbytes)
            except Exception:  # a metrics bug must not stop acks
                log.exception("committer: on_group callback failed")

    def _fail(self, group: list[_Entry]) -> None:
        nbytes = sum(len(e.payload) for e in group)
        self.stats.pending_bytes -= nbytes
        self._room.set()
        failed = {e.conn for e in group}
        # Later records of those connections are behind the failed ones: drop them
        # too (never acked), so no ack can skip over a hole.
        kept: deque[_Entry] = deque()
        for e in self._queue:
            if e.conn in failed:
                self.stats.pending_bytes -= len(e.payload)
            else:
                kept.append(e)
        self._queue.clear()
        self._queue.extend(kept)
        for conn in failed:
            conn.failed = True
            conn._wake.set()
            conn._room.set()
            conn._ready()
        self._wake_room_waiters()
