"""The direct lane: device frames from the WebSocket parser to the app without ASGI (issue 16).

Under ASGI every data frame becomes a dict, goes through an ``asyncio.Queue``,
wakes the app's reader task, passes Starlette's ``WebSocket.receive``, and every
reply goes back as a dict through an awaited ``send``; uvicorn also pauses and
resumes reading the socket around each message.  At 10,000 devices × 1 msg/s
each message pays all of that alone (nothing shares a wake-up).

:class:`node.httpguard.GuardedWebSocketProtocol` offers an accepted connection,
through the ASGI scope extension :data:`EXTENSION`
(``scope["extensions"]["iotnode.direct"]["open"]``), a switch to *direct mode*::

    lane = scope["extensions"][EXTENSION]["open"]()   # after websocket.accept
    lane.start(on_frame)          # on_frame(bytes | str), called from data_received
    lane.send(frame)              # bytes: a binary frame, str: a text frame; written at once
    lane.pause(); lane.resume()   # stop / restart handing frames to on_frame
    lane.close(code, reason)      # the closing handshake, as ASGI websocket.close
    code = await lane.done        # the close code once the connection is over for the app

What stays the protocol's: control frames (pings answered, pongs, the close
handshake), the frame size limit (1009 from the header), UTF-8 of text frames
(1007), keep-alive pings, and node.httpguard's limits (parsing in slices,
reading paused while the write buffer is above its limit).  ``on_frame`` runs
synchronously inside ``data_received``; frames parsed while the lane is paused
wait in a backlog of at most one slice's frames (reading stops with it) and are
handed over, in order, on :meth:`DirectLane.resume`.  After the switch the app
must not call ASGI ``receive`` (the protocol raises); the ASGI call itself stays
open until :attr:`DirectLane.done` so the server's bookkeeping (tasks, shutdown)
is unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from websockets.protocol import State

if TYPE_CHECKING:
    from node.httpguard import GuardedWebSocketProtocol

__all__ = ["EXTENSION", "DirectLane", "FrameHandler", "server_frame"]

log = logging.getLogger("iotnode.directlane")

#: The ASGI scope extension under which the protocol offers the switch.
EXTENSION = "iotnode.direct"

FrameHandler = Callable[[bytes | str], None]

_OP_TEXT = 0x81  # FIN + text
_OP_BINARY = 0x82  # FIN + binary
_pack_16 = struct.Struct("!BBH").pack
_pack_64 = struct.Struct("!BBQ").pack


def server_frame(frame: bytes | str) -> bytes:
    """One unfragmented, unmasked server → client data frame (RFC 6455 5.2)."""
    if type(frame) is str:
        data = frame.encode()
        op = _OP_TEXT
    else:
        data = frame  # type: ignore[assignment]
        op = _OP_BINARY
    n = len(data)
    if n < 126:
        return bytes((op, n)) + data
    if n < 65536:
        return _pack_16(op, 126, n) + data
    return _pack_64(op, 127, n) + data


class DirectLane:
    """One connection in direct mode (see the module docstring)."""

    __slots__ = ("_proto", "_on_frame", "_backlog", "paused", "done", "__weakref__")

    def __init__(self, proto: GuardedWebSocketProtocol) -> None:
        self._proto = proto
        self._on_frame: FrameHandler | None = None
        self._backlog: deque[bytes | str] = deque()  # parsed while paused (or before start)
        self.paused = True  # until start()
        self.done: asyncio.Future[int] = proto.loop.create_future()

    @property
    def holding(self) -> bool:
        """Frames must not be parsed now (paused, or a backlog still to hand over)."""
        return self.paused or bool(self._backlog)

    def start(self, on_frame: FrameHandler) -> None:
        """Hand every frame from now on (and any the ASGI queue held) to ``on_frame``."""
        if self._on_frame is not None:
            raise RuntimeError("the direct lane is already started")
        self._on_frame = on_frame
        self.resume()

    # -- frames in
    def deliver(self, frame: bytes | str) -> None:
        """From the protocol: one complete data message."""
        if self.paused or self._backlog:
            self._backlog.append(frame)
            return
        self._hand(frame)

    def _hand(self, frame: bytes | str) -> None:
        on_frame = self._on_frame
        assert on_frame is not None
        try:
            on_frame(frame)
        except Exception:  # the app's bug: this connection ends, the worker goes on
            log.exception("direct lane: the frame handler failed; closing the connection (1011)")
            self.close(1011, "internal error")

    def pause(self) -> None:
        """Stop handing frames over (and reading the socket) until :meth:`resume`."""
        if not self.paused:
            self.paused = True
            self._proto._set_reading()

    def resume(self) -> None:
        """Hand over the backlog, then go on parsing what was read and reading the socket."""
        if self._on_frame is None:
            return  # not started
        self.paused = False
        backlog = self._backlog
        while backlog and not self.paused:
            self._hand(backlog.popleft())
        if self.paused or backlog or self.done.done():
            return
        self._proto._lane_resumed()

    # -- frames out
    def send(self, frame: bytes | str) -> bool:
        """Write one data frame now (False if the connection is closing: nothing sent).

        Not awaited, not held back while the transport's buffer is above its high
        mark: the protocol stops reading the peer then, so what a peer that does not
        read can make us buffer is bounded by what it sent before the pause."""
        proto = self._proto
        if proto.close_sent or proto.conn.state is not State.OPEN:
            return False
        transport = proto.transport
        if transport.is_closing():
            return False
        transport.write(server_frame(frame))
        return True

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake with ``code`` (as ASGI ``websocket.close``)."""
        self._backlog.clear()
        self.paused = False
        self._proto._lane_close(code, reason)

    # -- from the protocol
    def _finish(self, code: int) -> None:
        self._backlog.clear()
        if not self.done.done():
            self.done.set_result(code)


class LaneInbox:
    """What replaces the protocol's ASGI queue in direct mode: every
    ``websocket.disconnect`` uvicorn's code puts there ends the lane; data frames
    never come here (the protocol hands them to the lane)."""

    __slots__ = ("_lane",)

    def __init__(self, lane: DirectLane) -> None:
        self._lane = lane

    def put_nowait(self, message: Any) -> None:
        if message.get("type") == "websocket.disconnect":
            self._lane._finish(int(message.get("code", 1005)))

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    async def get(self) -> Any:
        raise RuntimeError("the connection is in direct mode: ASGI receive is not available")
