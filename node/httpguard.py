"""Limits against hostile clients for both uvicorn servers (web and fanout).

uvicorn's httptools protocol, left alone, accepts a 20 MiB request line and
100,000 headers before websockets' own limits apply (llhttp has no limit; uvicorn
copies the URL on every chunk), runs no timer before the first response (a
connection that sends nothing, or trickles, stays forever), and counts no
connections per client.  After the upgrade, the websockets-sansio protocol parses
a whole read (up to 256 KiB) at once, so a burst of tiny frames queues tens of
thousands of events, and answers every ping even when the peer reads nothing.

The two protocol classes here are what ``node.workers.web`` and
``node.workers.fanout`` give uvicorn (``http=`` / ``ws=``, as import strings):

* :class:`GuardedHttpToolsProtocol` -- counts each connection against
  :attr:`Limits.max_connections` (this process) and
  :attr:`Limits.max_connections_per_ip` (this process, per client address) from
  TCP accept to close (over limit: ``503`` and close); caps the request line +
  headers at :attr:`Limits.max_header_bytes` (``431``); closes a connection that
  has not got its first response :attr:`Limits.handshake_timeout` seconds after
  accept (``408`` if nothing was answered yet; after a WebSocket upgrade: until
  the app accepted or denied it).  The deadline restarts after each HTTP response
  (keep-alive requests get as long each).
* :class:`GuardedWebSocketProtocol` -- feeds what the socket read to the
  WebSocket parser in slices of :data:`SLICE` bytes, and stops (keeping the rest,
  reading paused) while :attr:`Limits.ws_max_queued_frames` frames wait for the
  app or while the transport's write buffer is above
  :attr:`Limits.ws_max_unwritten_bytes` (a peer that pings but does not read its
  pongs stops being read).  So per connection at most ``ws_max_queued_frames +
  SLICE / 6`` frames are queued and about ``ws_max_unwritten_bytes + SLICE`` bytes
  wait to be written, whatever the peer does.  It also offers the app the
  *direct lane* (:mod:`node.directlane`, scope extension ``iotnode.direct``):
  data frames handed synchronously to an app callback, replies written at once,
  no ASGI message, queue or task wake-up per frame; the limits above hold there
  too (the lane's backlog counts like the queue).

:func:`install` (called in each server process before it serves) sets the
limits; :func:`open_connections` reports the counts (tests, debugging).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from asyncio import TimerHandle
from collections import Counter
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State
from websockets.speedups import apply_mask

from node.config import Settings
from node.directlane import EXTENSION, DirectLane, LaneInbox

__all__ = [
    "GuardedHttpToolsProtocol",
    "GuardedWebSocketProtocol",
    "HTTP_PROTOCOL",
    "Limits",
    "SLICE",
    "WS_PROTOCOL",
    "install",
    "set_user_timeout",
    "open_connections",
]

log = logging.getLogger("iotnode.httpguard")

HTTP_PROTOCOL = "node.httpguard:GuardedHttpToolsProtocol"
WS_PROTOCOL = "node.httpguard:GuardedWebSocketProtocol"

#: Bytes handed to the WebSocket parser at a time.  The smallest client frame is 6
#: bytes (2 header + 4 mask), so one slice yields at most ~341 frames.
SLICE = 2048

#: Direct lanes opened with the lane's own frame splitter (tests, debugging).
fast_lanes = 0


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 16384
    handshake_timeout: float = 10.0
    max_connections: int = 16384
    max_connections_per_ip: int = 8192
    ws_max_queued_frames: int = 32
    ws_max_unwritten_bytes: int = 256 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            handshake_timeout=settings.handshake_timeout,
            max_connections=settings.max_connections,
            max_connections_per_ip=settings.max_connections_per_ip,
            ws_max_queued_frames=settings.ws_max_queued_frames,
            ws_max_unwritten_bytes=settings.ws_max_unwritten_bytes,
        )


_limits: Limits | None = None
_open_total = 0
_open_by_ip: Counter[str] = Counter()


def install(limits: Limits) -> None:
    """Set this process's limits (before serving; the protocols read them per connection)."""
    global _limits
    _limits = limits


def _current() -> Limits:
    global _limits
    if _limits is None:  # a server started without install(): the configured values
        from node.config import load_settings

        _limits = Limits.from_settings(load_settings())
    return _limits


def open_connections() -> tuple[int, dict[str, int]]:
    """(open connections of this process, per client address)."""
    return _open_total, dict(_open_by_ip)


class _Slot:
    """One counted connection; released exactly once, by whichever protocol holds
    the transport when it is lost."""

    __slots__ = ("ip", "released")

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.released = False

    def release(self) -> None:
        global _open_total
        if self.released:
            return
        self.released = True
        _open_total -= 1
        left = _open_by_ip[self.ip] - 1
        if left > 0:
            _open_by_ip[self.ip] = left
        else:
            del _open_by_ip[self.ip]


def _acquire(ip: str, limits: Limits) -> _Slot | None:
    global _open_total
    if _open_total >= limits.max_connections or _open_by_ip[ip] >= limits.max_connections_per_ip:
        return None
    _open_total += 1
    _open_by_ip[ip] += 1
    return _Slot(ip)


def set_user_timeout(sock: socket.socket, milliseconds: int) -> None:
    """TCP_USER_TIMEOUT on a listening socket (inherited by accepted connections):
    data left unacknowledged (a peer that stopped reading, or vanished) for this
    long aborts the connection.  0 keeps the kernel's default (~15 min of retries)."""
    if milliseconds > 0 and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, milliseconds)


def _plain_response(status: int, phrase: str, body: str) -> bytes:
    data = body.encode("ascii")
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
    ).encode("ascii") + data


_TOO_MANY = _plain_response(503, "Service Unavailable", "too many connections\n")
_TIMEOUT = _plain_response(408, "Request Timeout", "request not received in time\n")


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with connection counts, a header cap and a deadline."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = _current()
        self._slot: _Slot | None = None
        self._head_bytes = 0  # bytes of the current request's line + headers so far
        self._head_done = False
        self._deadline: TimerHandle | None = None
        self._ws: GuardedWebSocketProtocol | None = None

    # -- connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ip = self.client[0] if self.client else "?"
        self._slot = _acquire(ip, self._guard)
        if self._slot is None:
            log.warning("refused a connection from %s: too many connections (HTTP 503)", ip)
            transport.write(_TOO_MANY)
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._slot is not None:
            self._slot.release()
        super().connection_lost(exc)

    # -- the deadline
    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self._guard.handshake_timeout, self._deadline_passed)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        ws = self._ws
        if ws is not None:  # upgraded: the app must have accepted or denied by now
            if not ws.handshake_complete and not ws.transport.is_closing():
                log.info("closed %s: WebSocket handshake not answered in time", _who(self.client))
                ws.transport.abort()
            return
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            log.info("closed %s: no complete request in time (HTTP 408)", _who(self.client))
            self.transport.write(_TIMEOUT)
            self.transport.close()
        else:  # a response is being sent: not the client's fault only; stop it anyway
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next keep-alive request gets its own deadline

    # -- the header cap
    def data_received(self, data: bytes) -> None:
        if self._slot is None or self._ws is not None:
            return  # refused (closing), or a leftover read after the upgrade
        if not self._head_done:
            room = self._guard.max_header_bytes - self._head_bytes
            if len(data) > room:
                head, rest = data[:room], data[room:]
                super().data_received(head)
                if not self._head_done:
                    self._refuse_headers()
                elif self._ws is None and self.parser is not None and not self.transport.is_closing():
                    self.data_received(rest)
                return
            self._head_bytes += len(data)
        super().data_received(data)

    def _refuse_headers(self) -> None:
        if self.transport.is_closing():
            return
        log.info(
            "refused %s: request line + headers over %d bytes (HTTP 431)",
            _who(self.client),
            self._guard.max_header_bytes,
        )
        body = f"request line and headers exceed {self._guard.max_header_bytes} bytes\n"
        self.transport.write(_plain_response(431, "Request Header Fields Too Large", body))
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._head_done = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_done = False  # what follows is the next request's head
        self._head_bytes = 0

    # -- the upgrade: uvicorn's, handing the slot and the deadline to the WebSocket protocol
    def handle_websocket_upgrade(self) -> None:
        self.connections.discard(self)
        method = self.scope["method"].encode()
        output = [method, b" ", self.url, b" HTTP/1.1\r\n"]
        for name, value in self.scope["headers"]:
            output += [name, b": ", value, b"\r\n"]
        output.append(b"\r\n")
        protocol = self.ws_protocol_class(  # type: ignore[misc]
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        if isinstance(protocol, GuardedWebSocketProtocol):
            protocol._slot, self._slot = self._slot, None
            self._ws = protocol
        else:  # not ours: keep counting until the deadline, then release
            self._disarm()
            if self._slot is not None:
                self._slot.release()
                self._slot = None
        protocol.connection_made(self.transport)
        self.transport.set_protocol(protocol)
        protocol.data_received(b"".join(output))


def _who(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with bounded queued frames and unwritten
    bytes, and the direct lane (:mod:`node.directlane`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        guard = _current()
        self._max_queued = guard.ws_max_queued_frames
        self._max_unwritten = guard.ws_max_unwritten_bytes
        self._slot: _Slot | None = None
        self._held = b""  # read from the socket, not yet given to the parser
        self._write_paused = False
        self._lane: DirectLane | None = None
        # Direct lane only: data frames are split here, websockets gets every other
        # frame whole (so its parser is always at a frame boundary); see _feed_split.
        self._split = False
        self._ws_fed = False  # websockets' parser has seen bytes after the request
        self._incomplete = False  # _held is one incomplete frame: read on, parse later
        # ... and when its header was complete: its pieces, collected until _need bytes
        self._parts: list[bytes] = []
        self._parts_len = 0
        self._need = 0
        self._heard = False  # bytes arrived since the last keep-alive tick

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        # pause_writing() is called above this many unwritten bytes
        transport.set_write_buffer_limits(high=self._max_unwritten)

    def connection_lost(self, exc: Exception | None) -> None:
        self._held = b""
        if self._slot is not None:
            self._slot.release()
        super().connection_lost(exc)

    def _room(self) -> bool:
        if self._write_paused:
            return False
        if self.close_sent:
            return True
        lane = self._lane
        if lane is not None:
            return not lane.holding
        return self.queue.qsize() < self._max_queued

    def data_received(self, data: bytes) -> None:
        self._heard = True
        if self._need:
            # The lane waits for the rest of one frame whose size it knows: collect the
            # pieces and join them once (adding each piece to _held copied it again
            # every time: quadratic in a 64 KiB frame sent a few bytes at a time).
            self._parts.append(data)
            self._parts_len += len(data)
            if self._parts_len < self._need:
                return  # still incomplete; reading goes on (_set_reading left it on)
            data = b"".join(self._parts)
            self._parts, self._parts_len, self._need = [], 0, 0
        self._held = self._held + data if self._held else data
        self._incomplete = False
        self._feed()

    def _feed(self) -> None:
        if self._split and not self.close_sent:
            self._feed_split()
            if self._split or not self._held:
                return
        held = self._held
        feed = super().data_received
        self._incomplete = False
        if held and self.handshake_initiated:
            self._ws_fed = True
        while held and self._room():
            chunk, held = held[:SLICE], held[SLICE:]
            self._held = held
            feed(chunk)
            if self.transport.is_closing():
                self._held = held = b""
        self._held = held
        self._set_reading()

    def _set_reading(self) -> None:
        if self.transport.is_closing():
            return
        if (self._held and not self._incomplete) or self._write_paused:
            pause = True
        elif self.close_sent:
            pause = False
        elif self._lane is not None:
            pause = self._lane.holding
        else:
            pause = not self.queue.empty()
        if pause and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        elif not pause and self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._write_paused = True
        self._set_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_paused = False
        if self._held:
            self._feed()
        else:
            self._set_reading()

    async def receive(self) -> Any:
        message = await self.queue.get()
        if self._held:
            self._feed()
        else:
            self._set_reading()
        return message

    async def send(self, message: Any) -> None:
        await super().send(message)
        if self.close_sent and self._held:  # frames are discarded now: parse on to the peer's close
            self._feed()

    def send_keepalive_ping(self) -> None:
        """Ping only a connection that was silent for a whole ping interval: bytes from the
        peer already prove it is there, and 10,000 devices sending once a second otherwise
        cost the workers ≈ 12 % of a core in pings and pongs (docs/bench.md).  A peer that
        goes silent is pinged within two intervals, and closed (1011) without its pong
        within ``ws_ping_timeout`` as before."""
        if self._heard and not self.close_sent:
            self._heard = False
            self.ping_timer = None
            self.schedule_ping()
            return
        super().send_keepalive_ping()

    # -- the direct lane
    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # set only when the upgrade goes to the app
        if scope is not None:
            scope["extensions"][EXTENSION] = {"open": self._open_lane}

    def _open_lane(self) -> DirectLane:
        """Switch this accepted connection to direct mode (node.directlane)."""
        if self._lane is not None:
            raise RuntimeError("the connection is already in direct mode")
        if not self.handshake_complete or self.initial_response is not None:
            raise RuntimeError("the direct lane opens only on an accepted WebSocket")
        global fast_lanes
        lane = DirectLane(self)
        queued = self.queue
        # Split frames here only if websockets' parser stands at a frame boundary: it
        # has seen nothing after the request (a device that sent frames before the 101
        # keeps websockets' parsing) and no extension transforms frames.
        self._split = not self._ws_fed and not self.conn.reader.buffer and not self.conn.extensions
        fast_lanes += self._split
        self._lane = lane
        self.queue = LaneInbox(lane)  # type: ignore[assignment]
        while not queued.empty():  # what the app had not received yet, in order
            message: Any = queued.get_nowait()
            kind = message["type"]
            if kind == "websocket.receive":
                frame = message.get("bytes")
                lane.deliver(frame if frame is not None else message.get("text", ""))
            elif kind == "websocket.disconnect":
                lane._finish(int(message.get("code", 1005)))
        return lane

    def _feed_split(self) -> None:
        """The direct lane's parse: complete, unfragmented, masked text/binary frames
        within the size limit are unmasked here and handed to the lane; any other
        complete frame (ping, pong, close, fragments, reserved bits or opcodes) goes to
        websockets whole, as before; a header websockets must refuse (unmasked: 1002,
        over the size limit: 1009) goes to it with the rest of the stream, and
        websockets parses from then on.  Stops like the slices do: while the lane
        holds frames or the write buffer is over its limit."""
        held = self._held
        lane = self._lane
        assert lane is not None
        conn = self.conn
        limit = conn.max_message_size
        ws_frame = super().data_received
        pos, end = 0, len(held)
        incomplete = False
        need = 0  # the incomplete frame's whole size, once its header is complete
        while pos < end:
            if self._write_paused or lane.holding or self.close_sent or self.transport.is_closing():
                break
            left = end - pos
            if left < 2:
                incomplete = True
                break
            b0, b1 = held[pos], held[pos + 1]
            n = b1 & 0x7F
            if n < 126:
                head = 2
            elif n == 126:
                if left < 4:
                    incomplete = True
                    break
                n, head = int.from_bytes(held[pos + 2 : pos + 4], "big"), 4
            else:
                if left < 10:
                    incomplete = True
                    break
                n, head = int.from_bytes(held[pos + 2 : pos + 10], "big"), 10
            current = conn.current_size
            if not b1 & 0x80 or (limit is not None and n > limit - (current or 0)):
                self._split = False  # websockets refuses it from the header and closes
                break
            size = head + 4 + n
            if left < size:
                incomplete = True
                need = size
                break
            start = pos + head
            pos += size
            if (b0 == 0x82 or b0 == 0x81) and current is None and conn.state is State.OPEN:
                data = apply_mask(held[start + 4 : pos], held[start : start + 4])
                if b0 == 0x82:
                    lane.deliver(data)
                    continue
                try:
                    text = data.decode()
                except UnicodeDecodeError:
                    self._held = b""
                    self.logger.exception("Invalid UTF-8 sequence received from client.")
                    conn.send_close(1007)
                    self.handle_parser_exception()
                    return
                lane.deliver(text)
            else:
                self._ws_fed = True
                ws_frame(held[pos - size : pos])
        self._held = held[pos:] if pos else held
        self._incomplete = incomplete and self._split
        if self._incomplete and need:
            self._parts, self._parts_len, self._need = [self._held], len(self._held), need
            self._held = b""
        if self.transport.is_closing():
            self._held = b""
        if self._split or not self._held:
            self._set_reading()

    def send_receive_event_to_app(self) -> None:
        lane = self._lane
        if lane is None:
            super().send_receive_event_to_app()
            return
        frames = self.frames
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        self.frames = []
        if self.close_sent:
            return  # past the app's close: discarded, reading goes on to the peer's close
        if self.curr_msg_data_type == "text":
            try:
                text = data.decode()
            except UnicodeDecodeError:
                self.logger.exception("Invalid UTF-8 sequence received from client.")
                self.conn.send_close(1007)
                self.handle_parser_exception()
                return
            lane.deliver(text)
        else:
            lane.deliver(data)

    def _lane_resumed(self) -> None:
        if self._held:
            self._feed()
        else:
            self._set_reading()

    def _lane_close(self, code: int, reason: str) -> None:
        """uvicorn's ``websocket.close`` (send()), synchronously."""
        if self.close_sent or self.disconnected or self.transport.is_closing():
            return
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)
        if self._held:  # frames are discarded now: parse on to the peer's close
            self._feed()
