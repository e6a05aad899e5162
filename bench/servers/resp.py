"""A minimal pipelined Redis (RESP2) client for asyncio: one connection, FIFO replies.

Only what the Redis Streams front needs (XADD, PING); many coroutines share one
connection and their commands are pipelined, so Redis's ``appendfsync always``
fsync covers a whole burst, as a group commit.
"""

from __future__ import annotations

import asyncio
from collections import deque


class RedisError(Exception):
    """An error reply from Redis or a broken connection, with the server's text."""


def encode_command(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[asyncio.Future[bytes | int | None]] = deque()
        self.buf = bytearray()
        self.closed_exc: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed_exc = RedisError(f"connection to redis lost: {exc!r}")
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(self.closed_exc)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while True:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            kind = buf[pos]
            value: bytes | int | None | RedisError
            if kind == 0x24:  # $ bulk string
                n = int(buf[pos + 1 : nl])
                if n < 0:
                    value, pos = None, nl + 2
                else:
                    if len(buf) < nl + 2 + n + 2:
                        break
                    value, pos = bytes(buf[nl + 2 : nl + 2 + n]), nl + 2 + n + 2
            elif kind == 0x2B:  # + simple string
                value, pos = bytes(buf[pos + 1 : nl]), nl + 2
            elif kind == 0x3A:  # : integer
                value, pos = int(buf[pos + 1 : nl]), nl + 2
            elif kind == 0x2D:  # - error
                value, pos = RedisError(buf[pos + 1 : nl].decode(errors="replace")), nl + 2
            else:
                raise RedisError(f"unsupported RESP reply type {bytes(buf[pos : pos + 1])!r}")
            fut = self.waiters.popleft()
            if not fut.done():
                if isinstance(value, RedisError):
                    fut.set_exception(value)
                else:
                    fut.set_result(value)
        del buf[:pos]


class Redis:
    def __init__(self, protocol: _Protocol) -> None:
        self._p = protocol

    @classmethod
    async def connect(cls, host: str, port: int) -> Redis:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_Protocol, host, port)
        return cls(protocol)

    def command(self, *args: bytes) -> asyncio.Future[bytes | int | None]:
        p = self._p
        if p.closed_exc is not None:
            raise p.closed_exc
        fut: asyncio.Future[bytes | int | None] = asyncio.get_running_loop().create_future()
        p.waiters.append(fut)
        assert p.transport is not None
        p.transport.write(encode_command(*args))
        return fut

    def close(self) -> None:
        if self._p.transport is not None:
            self._p.transport.close()
