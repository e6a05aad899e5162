"""The device connection: window, resend on reconnect, backoff, futures (see :mod:`node.client`)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
from websockets.uri import parse_uri

from node.client.outbox import Outbox, OutboxError
from node.errors import NodeError
from node.protocol import Ack, ProtocolError, decode_reply, encode_message

log = logging.getLogger("node.client")

#: The node's default ``NODE_MAX_MESSAGE_BYTES``.
DEFAULT_MAX_MESSAGE_BYTES: Final = 65536
CLOSE_TOO_BIG: Final = 1009
_REFUSED_STATUSES: Final = (401, 403)
#: A connection that lived this long (or got an ack) resets the backoff.
_STABLE_AFTER: Final = 5.0


# ----------------------------------------------------------------------- errors
class ClientError(NodeError):
    """Root of the device client's exceptions."""


class HandshakeRefused(ClientError):
    """The node refused the WebSocket handshake (bad, expired or foreign token)."""

    def __init__(self, status: int, url: str) -> None:
        self.status = status
        self.url = url
        super().__init__(f"the node refused the connection to {url} with HTTP {status}: check the token")


class MessageRejected(ClientError):
    """The node answered ``{"error": reason, "seq": seq}`` for this message."""

    def __init__(self, seq: int, reason: str) -> None:
        self.seq = seq
        self.reason = reason
        super().__init__(f"the node rejected seq {seq}: {reason}")


class MessageTooLarge(ClientError, ValueError):
    """A message over the frame limit.  ``seq`` is None when refused before a seq
    was assigned (over the known limit); ``by_node`` when the node closed 1009."""

    def __init__(self, size: int, limit: int | None, seq: int | None = None, by_node: bool = False) -> None:
        self.size = size
        self.limit = limit
        self.seq = seq
        self.by_node = by_node
        if by_node:
            text = f"the node closed the connection with 1009 (message too big): seq {seq} is {size} bytes"
        else:
            text = f"message is {size} bytes, the limit is {limit} bytes"
        super().__init__(text)


class ClientClosed(ClientError):
    """The client was closed before the message was acked."""

    def __init__(self, seq: int | None = None) -> None:
        self.seq = seq
        super().__init__(
            "the client is closed" if seq is None else f"the client closed before seq {seq} was acked"
        )


# ---------------------------------------------------------------------- backoff
@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: attempt ``k`` waits a uniformly random
    time in ``[0, min(maximum, initial * factor**k)]`` (AWS "full jitter"), so
    clients dropped together spread their reconnects over the whole interval."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not self.initial > 0:
            raise ValueError(f"backoff initial must be > 0 seconds, got {self.initial!r}")
        if not self.maximum >= self.initial:
            raise ValueError(f"backoff maximum must be >= initial ({self.initial}), got {self.maximum!r}")
        if not self.factor >= 1:
            raise ValueError(f"backoff factor must be >= 1, got {self.factor!r}")

    def ceiling(self, attempt: int) -> float:
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        return min(self.maximum, self.initial * self.factor ** min(attempt, 64))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        return (rng or random).uniform(0.0, self.ceiling(attempt))


# ----------------------------------------------------------------------- client
class _Entry:
    __slots__ = ("frame", "size", "future")

    def __init__(self, frame: bytes | str, future: asyncio.Future[int], size: int | None = None) -> None:
        self.frame = frame
        if size is None:
            size = len(frame) if isinstance(frame, bytes) else len(frame.encode("utf-8"))
        self.size = size
        self.future = future


def _clock_seq() -> int:
    """A first seq above anything this device sent before (microseconds since the
    epoch): used when there is no outbox to continue from."""
    return time.time_ns() // 1000


def _consume(future: asyncio.Future[int]) -> None:
    # Errors are also logged and passed to on_error: a device that never awaits
    # its futures must not fill the log with "exception was never retrieved".
    if not future.cancelled():
        future.exception()


class DeviceClient:
    """One device's connection to a node; see the module docstring.

    Bounds: at most ``window`` messages are on the wire unacked (the node's
    ``NODE_CONN_WINDOW`` is 256 by default); at most ``max_pending`` messages are
    kept unacked in all (memory, and the outbox) -- ``send`` waits when it is
    full.  ``first_seq`` defaults to the outbox's next seq, else to the clock in
    microseconds, so a restarted device never reuses a seq the node has stored.
    """

    def __init__(
        self,
        url: str,
        token: str | Callable[[], str],
        *,
        binary: bool = True,
        window: int = 256,
        max_pending: int = 10_000,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        backoff: Backoff | None = None,
        outbox: str | Path | None = None,
        outbox_synchronous: str = "FULL",
        device: str = "",
        first_seq: int | None = None,
        on_ack: Callable[[int], None] | None = None,
        on_error: Callable[[ClientError], None] | None = None,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        rng: random.Random | None = None,
    ) -> None:
        try:
            parse_uri(url)
        except InvalidURI:
            raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}") from None
        if not callable(token) and (not token or not isinstance(token, str)):
            raise ValueError("expected a non-empty token string, or a callable returning one")
        for name, value, low in (
            ("window", window, 1),
            ("max_pending", max_pending, 1),
            ("max_message_bytes", max_message_bytes, 16),
        ):
            if type(value) is not int or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if first_seq is not None and (type(first_seq) is not int or first_seq < 0):
            raise ValueError(f"first_seq must be a non-negative integer, got {first_seq!r}")
        self.url = url
        self._token = token
        self.binary = binary
        self.window = window
        self.max_pending = max_pending
        self.max_message_bytes = max_message_bytes  # lowered when the node closes 1009
        self.backoff = backoff or Backoff()
        self._on_ack = on_ack
        self._on_error = on_error
        self._open_timeout = open_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._rng = rng or random.Random()

        self._outbox: Outbox | None = None
        self._outbox_args = (outbox, outbox_synchronous, device)
        self._first_seq = first_seq
        self._next_seq = 0
        self._pending: dict[int, _Entry] = {}  # insertion order == seq order
        self._unsent: deque[int] = deque()  # not yet sent on the current connection
        self._inflight: OrderedDict[int, None] = OrderedDict()  # sent on it, unacked
        self._ws: ClientConnection | None = None
        self._runner: asyncio.Task[None] | None = None
        self._changed: asyncio.Future[None] | None = None
        self._fatal: ClientError | None = None
        self._closing = False
        self._closed = False
        self._conn_acked = False
        self._connecting = False  # inside the handshake (close() may cancel it)

        # Counters, for callers and tests.
        self.sent_frames = 0  # frames written, resends included
        self.acked = 0
        self.rejected = 0
        self.attempts = 0  # connection attempts (handshakes tried)
        self.connections = 0  # successful handshakes
        # time.monotonic() of the last 100 attempts / successful handshakes
        self.attempt_times: deque[float] = deque(maxlen=100)
        self.connect_times: deque[float] = deque(maxlen=100)

    # -------------------------------------------------------------- lifecycle
    async def start(self, wait: bool = True, timeout: float | None = None) -> None:
        """Open the outbox and start connecting in the background.

        With ``wait``, return once the first handshake succeeded; raise
        :class:`HandshakeRefused` if the token is refused, ``TimeoutError`` after
        ``timeout`` seconds (the client is closed then).
        """
        if self._runner is not None:
            raise RuntimeError("the client is already started")
        path, synchronous, device = self._outbox_args
        if path is not None:
            first = self._first_seq if self._first_seq is not None else _clock_seq()
            self._outbox = Outbox(path, device=device, first_seq=first, synchronous=synchronous)
            loop = asyncio.get_running_loop()
            for seq, frame in self._outbox.pending():
                self._add_entry(seq, frame, loop.create_future())
            self._next_seq = self._outbox.next_seq
            if self._pending:
                log.info("outbox %s: %d unacked messages to resend", path, len(self._pending))
        else:
            self._next_seq = self._first_seq if self._first_seq is not None else _clock_seq()
        self._runner = asyncio.create_task(self._run(), name=f"iotnode-client {self.url}")
        self._runner.add_done_callback(self._runner_done)
        if not wait:
            return
        try:
            await asyncio.wait_for(
                self._wait_for(lambda: self.connections > 0 or self._fatal is not None), timeout
            )
        except TimeoutError:
            await self.close(flush=False)
            raise TimeoutError(f"no connection to {self.url} within {timeout} s") from None
        if self._fatal is not None:
            await self.close(flush=False)
            raise self._fatal

    async def close(self, flush: bool = True, timeout: float | None = None) -> None:
        """Stop the client.  With ``flush``, first wait (up to ``timeout`` s) for
        every message to be acked.  Futures still pending get :class:`ClientClosed`;
        their messages stay in the outbox for the next start."""
        if self._closed:
            return
        if flush and self._runner is not None and self._fatal is None:
            try:
                await asyncio.wait_for(
                    self._wait_for(lambda: not self._pending or self._fatal is not None), timeout
                )
            except TimeoutError:
                log.warning("close: %d messages still unacked after %s s", len(self._pending), timeout)
        self._closing = True
        self._notify()
        ws = self._ws
        if ws is not None:
            await ws.close()
        runner = self._runner
        if runner is not None:
            if self._connecting:  # do not wait out a handshake with an unreachable node
                runner.cancel()
            await asyncio.wait({runner})
        self._closed = True
        error = self._fatal
        for seq, entry in self._pending.items():
            if not entry.future.done():
                entry.future.set_exception(error if error is not None else ClientClosed(seq))
        self._pending.clear()
        if self._outbox is not None:
            self._outbox.close()

    async def __aenter__(self) -> DeviceClient:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        await self.close(flush=exc_type is None)  # an error in the block: do not wait for acks

    # ----------------------------------------------------------------- sending
    @property
    def pending(self) -> int:
        """Messages accepted by :meth:`send` and not yet acked or refused."""
        return len(self._pending)

    @property
    def connected(self) -> bool:
        return self._ws is not None

    @property
    def next_seq(self) -> int:
        return self._next_seq

    async def send(self, data: Any, ts: float | int | None = None) -> asyncio.Future[int]:
        """Queue one message; return a future resolved with its seq when acked.

        Waits while ``max_pending`` messages are unacked.  Raises ``ProtocolError``
        for data the node would refuse and :class:`MessageTooLarge` over the frame
        limit (nothing queued, no seq used), :class:`HandshakeRefused` /
        :class:`ClientClosed` when the client cannot send any more,
        :class:`node.client.outbox.OutboxError` when the outbox cannot store it.
        """
        if (
            len(self._pending) >= self.max_pending
            or self._fatal is not None
            or self._closing
            or self._runner is None
        ):
            return (await self.send_many([(data, ts)]))[0]  # waits for room, or raises
        seq = self._next_seq
        frame, size = self._encode(seq, data, ts)
        if self._outbox is not None:
            self._outbox.add(((seq, frame),))
        self._next_seq = seq + 1
        future = self._add_entry(seq, frame, asyncio.get_running_loop().create_future(), size)
        self._notify()
        return future

    async def send_many(
        self, messages: Iterable[tuple[Any, float | int | None]]
    ) -> list[asyncio.Future[int]]:
        """Queue ``(data, ts)`` pairs in order, committing the outbox once per
        chunk of up to ``max_pending``; same errors as :meth:`send` (a refused
        message stops the batch: the ones before it are queued)."""
        futures: list[asyncio.Future[int]] = []
        batch = list(messages)
        loop = asyncio.get_running_loop()
        start = 0
        while start < len(batch):
            self._check_open()
            await self._wait_for(
                lambda: len(self._pending) < self.max_pending or self._fatal is not None or self._closing
            )
            self._check_open()
            room = self.max_pending - len(self._pending)
            chunk = batch[start : start + room]
            encoded: list[tuple[int, bytes | str]] = []
            seq = self._next_seq
            failure: Exception | None = None
            for data, ts in chunk:
                try:
                    frame, _ = self._encode(seq, data, ts)
                except (ProtocolError, MessageTooLarge) as exc:
                    failure = exc
                    break
                encoded.append((seq, frame))
                seq += 1
            if encoded:
                if self._outbox is not None:
                    self._outbox.add(encoded)
                for s, frame in encoded:
                    futures.append(self._add_entry(s, frame, loop.create_future()))
                self._next_seq = seq
                self._notify()
            if failure is not None:
                raise failure
            start += len(chunk)
        return futures

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued message is acked or refused (``TimeoutError``
        after ``timeout`` s); raises :class:`HandshakeRefused` if the token was."""
        await asyncio.wait_for(self._wait_for(lambda: not self._pending or self._fatal is not None), timeout)
        if self._fatal is not None:
            raise self._fatal

    def _check_open(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closing or self._closed:
            raise ClientClosed()
        if self._runner is None:
            raise RuntimeError("start() the client (or use connect()) before sending")

    def _encode(self, seq: int, data: Any, ts: float | int | None) -> tuple[bytes | str, int]:
        frame = encode_message(seq, data, ts, self.binary)
        size = len(frame) if isinstance(frame, bytes) else len(frame.encode("utf-8"))
        if size > self.max_message_bytes:
            raise MessageTooLarge(size, self.max_message_bytes)
        return frame, size

    def _add_entry(
        self, seq: int, frame: bytes | str, future: asyncio.Future[int], size: int | None = None
    ) -> asyncio.Future[int]:
        future.add_done_callback(_consume)
        self._pending[seq] = _Entry(frame, future, size)
        self._unsent.append(seq)
        return future

    # ------------------------------------------------------------ state change
    def _notify(self) -> None:
        changed = self._changed
        if changed is not None and not changed.done():
            changed.set_result(None)
        self._changed = None

    async def _wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._changed)

    # -------------------------------------------------------------- connection
    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            ws = await self._open()
            if self._fatal is not None:
                return
            if ws is not None:
                started = time.monotonic()
                await self._serve(ws)
                if self._conn_acked or time.monotonic() - started >= _STABLE_AFTER:
                    attempt = 0
            if self._closing:
                break
            delay = self.backoff.delay(attempt, self._rng)
            attempt += 1
            try:
                await asyncio.wait_for(self._wait_for(lambda: self._closing), delay)
            except TimeoutError:
                pass

    async def _open(self) -> ClientConnection | None:
        """One handshake: the connection, or None to retry (refusal: fatal, no retry)."""
        self.attempts += 1
        self.attempt_times.append(time.monotonic())
        self._connecting = True
        try:
            return await ws_connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {self._current_token()}"},
                compression=None,
                open_timeout=self._open_timeout,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_timeout,
                max_size=1 << 16,  # replies are tiny
                proxy=None,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in _REFUSED_STATUSES:
                self._fail(HandshakeRefused(status, self.url))
            else:
                log.warning("connect to %s: HTTP %d, retrying", self.url, status)
        except (OSError, TimeoutError) as exc:
            log.info("connect to %s failed (%s), retrying", self.url, exc or type(exc).__name__)
        except Exception as exc:  # websockets' InvalidHandshake family, bad responses
            log.warning("connect to %s failed (%s: %s), retrying", self.url, type(exc).__name__, exc)
        finally:
            self._connecting = False
        return None

    async def _serve(self, ws: ClientConnection) -> None:
        """Run one connection: resend everything unacked in order, then keep going."""
        if self._closing:  # close() came while the handshake was in progress
            await ws.close()
            return
        self._ws = ws
        self._conn_acked = False
        self._inflight.clear()
        self._unsent = deque(self._pending)
        self.connections += 1
        self.connect_times.append(time.monotonic())
        self._notify()
        sender = asyncio.create_task(self._send_loop(ws))
        try:
            async for frame in ws:
                self._on_frame(frame)
        except ConnectionClosed:
            pass
        finally:
            self._ws = None
            sender.cancel()
            await asyncio.wait({sender})
            if ws.close_code == CLOSE_TOO_BIG:
                self._on_too_big()
            self._notify()
        if not self._closing:
            log.info(
                "connection to %s closed (code %s); %d messages unacked",
                self.url,
                ws.close_code,
                len(self._pending),
            )

    async def _send_loop(self, ws: ClientConnection) -> None:
        try:
            await self._send_frames(ws)
        except ConnectionClosed:
            pass  # the reader sees the close too
        except Exception:  # a bug: end this connection so that the next one resends
            log.exception("send loop failed; reconnecting")
            await ws.close(code=1011)

    async def _send_frames(self, ws: ClientConnection) -> None:
        while True:
            await self._wait_for(lambda: bool(self._unsent) and len(self._inflight) < self.window)
            frames: list[bytes | str] = []
            while self._unsent and len(self._inflight) < self.window:
                seq = self._unsent.popleft()
                entry = self._pending.get(seq)
                if entry is None:
                    continue
                if entry.size > self.max_message_bytes:  # the limit dropped after a 1009
                    self._drop(seq, MessageTooLarge(entry.size, self.max_message_bytes, seq))
                    continue
                self._inflight[seq] = None
                frames.append(entry.frame)
            for frame in frames:
                await ws.send(frame)
                self.sent_frames += 1

    # ----------------------------------------------------------------- replies
    def _on_frame(self, frame: bytes | str) -> None:
        try:
            reply = decode_reply(frame)
        except ProtocolError as exc:
            log.warning("ignoring a frame from the node that is not protocol v1: %s", exc)
            return
        if isinstance(reply, Ack):
            self._on_ack_frame(reply.n)
        else:
            self._on_error_frame(reply.seq, reply.reason)

    def _on_ack_frame(self, n: int) -> None:
        inflight = self._inflight
        done: list[tuple[int, _Entry]] = []
        while inflight:
            seq = next(iter(inflight))
            if seq > n:
                break
            inflight.popitem(last=False)
            entry = self._pending.pop(seq, None)
            if entry is not None:
                done.append((seq, entry))
        if not done:
            return
        self._conn_acked = True
        if self._outbox is not None:
            try:
                self._outbox.remove_through(done[-1][0])
            except OutboxError as exc:  # they stay on disk: resent next start, deduplicated by the node
                log.error("%s", exc)
        self.acked += len(done)
        for seq, entry in done:
            if not entry.future.done():
                entry.future.set_result(seq)
            if self._on_ack is not None:
                self._callback(self._on_ack, seq)
        self._notify()

    def _on_error_frame(self, seq: int | None, reason: str) -> None:
        if seq is None or seq not in self._pending:
            log.warning("the node refused a frame (seq %s): %s", seq, reason)
            return
        self._inflight.pop(seq, None)
        self._drop(seq, MessageRejected(seq, reason))

    def _on_too_big(self) -> None:
        # The node closed 1009: one frame sent on that connection was over its limit,
        # and the node never acked it.  The largest unacked frame sent on it is at
        # least as large as that one, so it is over the limit too: refuse it, never
        # send anything that large again, and resend the rest on the next connection.
        sent = [(self._pending[s].size, s) for s in self._inflight if s in self._pending]
        if not sent:
            log.warning("the node closed 1009 but no sent message is unacked")
            return
        size, seq = max(sent)
        self.max_message_bytes = min(self.max_message_bytes, size - 1)
        self._drop(seq, MessageTooLarge(size, None, seq, by_node=True))

    def _drop(self, seq: int, error: ClientError) -> None:
        """A message that will not be resent: remove it everywhere, fail its future."""
        entry = self._pending.pop(seq)
        if self._outbox is not None:
            try:
                self._outbox.remove(seq)
            except OutboxError as exc:
                log.error("%s", exc)
        self.rejected += 1
        log.warning("%s", error)
        if not entry.future.done():
            entry.future.set_exception(error)
        if self._on_error is not None:
            self._callback(self._on_error, error)
        self._notify()

    def _current_token(self) -> str:
        return self._token() if callable(self._token) else self._token

    @staticmethod
    def _callback(fn: Callable[[Any], None], arg: Any) -> None:
        try:
            fn(arg)
        except Exception:  # the caller's bug must not stop the connection
            log.exception("on_ack/on_error callback raised")

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("the client stopped on an unexpected error", exc_info=exc)
        self._fail(ClientError(f"the client stopped on an unexpected error: {type(exc).__name__}: {exc}"))

    def _fail(self, error: ClientError) -> None:
        log.error("%s", error)
        self._fatal = error
        for entry in self._pending.values():
            if not entry.future.done():
                entry.future.set_exception(error)
        if self._on_error is not None:
            self._callback(self._on_error, error)
        self._notify()


async def connect(
    url: str,
    token: str | Callable[[], str],
    *,
    wait: bool = True,
    timeout: float | None = None,
    **options: Any,
) -> DeviceClient:
    """Create a :class:`DeviceClient` and start it (see :meth:`DeviceClient.start`)."""
    client = DeviceClient(url, token, **options)
    await client.start(wait=wait, timeout=timeout)
    return client
