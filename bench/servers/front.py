"""Baseline device fronts: the same stack as iotnode's ``web`` (uvicorn workers +
Starlette, websockets sans-I/O, no permessage-deflate) speaking device protocol v1.

``--sink noop``  acks each message without persisting it: the front's practical limit.
``--sink redis`` XADDs each message to a Redis stream (``appendfsync always``), acks
                 when Redis has answered, i.e. after its fsync.

Test knobs: ``--ack-delay-ms`` delays every ack (a deliberately slow server);
``--coalesce`` sends one cumulative ack per read burst instead of one per message;
``--close-after N`` closes each connection (code 1012) on its N-th message, unacked.

Run: ``python -m bench.servers.front --port 8100 --workers 2 --secret S [--sink redis --redis-port P]``
Options reach the uvicorn worker processes through ``BENCH_FRONT_*`` environment
variables set by :func:`main` (read once, in :func:`_options`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any

import jwt
import msgpack
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from bench.servers.resp import Redis

_MAX_PENDING_ACKS = 4096  # delayed acks buffered per connection before reading pauses


@dataclass(frozen=True)
class Options:
    sink: str = "noop"
    secret: str = ""
    ack_delay: float = 0.0
    coalesce: bool = False
    redis_port: int = 6379
    close_after: int = 0  # close each connection (1012) when this many messages came, unacked
    stream: bytes = b"iot"


def _options() -> Options:
    env = os.environ
    return Options(
        sink=env.get("BENCH_FRONT_SINK", "noop"),
        secret=env.get("BENCH_FRONT_SECRET", ""),
        ack_delay=float(env.get("BENCH_FRONT_ACK_DELAY_MS", "0")) / 1000.0,
        coalesce=env.get("BENCH_FRONT_COALESCE", "0") == "1",
        redis_port=int(env.get("BENCH_FRONT_REDIS_PORT", "6379")),
        close_after=int(env.get("BENCH_FRONT_CLOSE_AFTER", "0")),
    )


OPTS = _options()
_redis: Redis | None = None
_redis_lock = asyncio.Lock()


async def _get_redis() -> Redis:
    global _redis
    async with _redis_lock:
        if _redis is None:
            _redis = await Redis.connect("127.0.0.1", OPTS.redis_port)
        return _redis


def _token(ws: WebSocket) -> str | None:
    auth = ws.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return ws.query_params.get("token")


def _parse(raw: bytes | str, binary: bool) -> tuple[int | None, str | None]:
    """(seq, None) for a valid message, (seq or None, reason) otherwise."""
    try:
        obj: Any = msgpack.unpackb(raw) if binary else json.loads(raw)
    except Exception:  # noqa: BLE001 - the reason goes back to the device
        return None, "undecodable message"
    if not isinstance(obj, dict):
        return None, f"expected a map, got {type(obj).__name__}"
    seq = obj.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        return None, f"seq must be a non-negative integer, got {seq!r:.40}"
    if "data" not in obj:
        return seq, "data missing"
    return seq, None


def _encode(obj: dict[str, Any], binary: bool) -> dict[str, Any]:
    if binary:
        return {"type": "websocket.send", "bytes": msgpack.packb(obj)}
    return {"type": "websocket.send", "text": json.dumps(obj, separators=(",", ":"))}


class _Acker:
    """Sends acks in order, optionally delayed and/or coalesced (one per burst)."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.pending: deque[tuple[float, int, bool]] = deque()
        self.wake = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.task = asyncio.get_running_loop().create_task(self._run())

    def put(self, due: float, seq: int, binary: bool) -> None:
        self.pending.append((due, seq, binary))
        if len(self.pending) >= _MAX_PENDING_ACKS:
            self.room.clear()
        self.wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pending = self.pending
        while True:
            if not pending:
                self.wake.clear()
                await self.wake.wait()
                continue
            delay = pending[0][0] - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = loop.time()
            while pending and pending[0][0] <= now:
                _, seq, binary = pending.popleft()
                if OPTS.coalesce and pending and pending[0][0] <= now and pending[0][2] == binary:
                    continue  # a later ack covers this one
                await self.ws.send(_encode({"ack": seq}, binary))
            if len(pending) < _MAX_PENDING_ACKS // 2:
                self.room.set()


async def ingest(ws: WebSocket) -> None:
    token = _token(ws)
    try:
        if not token:
            raise jwt.InvalidTokenError("no token")
        claims = jwt.decode(token, OPTS.secret, algorithms=["HS256"])
        if not isinstance(claims.get("sub"), str):
            raise jwt.InvalidTokenError("no sub")
    except jwt.InvalidTokenError:
        await ws.close(code=1008)  # before accept: HTTP 403, no upgrade
        return
    await ws.accept()
    redis = await _get_redis() if OPTS.sink == "redis" else None
    acker: _Acker | None = _Acker(ws) if (OPTS.ack_delay > 0 or OPTS.coalesce) else None
    loop = asyncio.get_running_loop()
    stream = OPTS.stream
    received = 0
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            raw = msg.get("bytes")
            binary = raw is not None
            if not binary:
                raw = msg.get("text")
                if raw is None:
                    continue
            seq, error = _parse(raw, binary)  # type: ignore[arg-type]
            if error is not None:
                await ws.send(_encode({"error": error, "seq": seq}, binary))
                continue
            assert seq is not None
            received += 1
            if received == OPTS.close_after:
                await ws.close(code=1012)  # "service restart": the device must resend
                return
            if redis is not None:
                body = raw if binary else raw.encode()  # type: ignore[union-attr]
                await redis.command(b"XADD", stream, b"*", b"m", body)  # type: ignore[arg-type]
            if acker is None:
                await ws.send(_encode({"ack": seq}, binary))
            else:
                acker.put(loop.time() + OPTS.ack_delay, seq, binary)
                if not acker.room.is_set():
                    await acker.room.wait()
    except WebSocketDisconnect:
        return
    finally:
        if acker is not None:
            acker.task.cancel()


app = Starlette(routes=[WebSocketRoute("/v1/ingest", ingest)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.servers.front", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--secret", required=True, help="HS256 key the device tokens are signed with")
    ap.add_argument("--sink", choices=("noop", "redis"), default="noop")
    ap.add_argument("--redis-port", type=int, default=6379)
    ap.add_argument("--ack-delay-ms", type=float, default=0.0)
    ap.add_argument("--coalesce", action="store_true")
    ap.add_argument(
        "--close-after", type=int, default=0, help="test knob: drop each connection after N messages"
    )
    args = ap.parse_args(argv)
    if not args.host.startswith("127."):
        ap.error(f"--host must be a loopback address (127.x.x.x), got {args.host!r}")
    if args.ack_delay_ms < 0:
        ap.error(f"--ack-delay-ms must be >= 0, got {args.ack_delay_ms}")
    os.environ.update(
        BENCH_FRONT_SINK=args.sink,
        BENCH_FRONT_SECRET=args.secret,
        BENCH_FRONT_ACK_DELAY_MS=str(args.ack_delay_ms),
        BENCH_FRONT_COALESCE="1" if args.coalesce else "0",
        BENCH_FRONT_REDIS_PORT=str(args.redis_port),
        BENCH_FRONT_CLOSE_AFTER=str(args.close_after),
    )
    import uvicorn

    from bench.loadgen import raise_nofile_limit

    raise_nofile_limit(1 << 20)  # C10K: the workers inherit it, as iotnode's web does
    uvicorn.run(
        "bench.servers.front:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="auto",
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        ws_ping_interval=None,
        lifespan="off",
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    sys.exit(main())
