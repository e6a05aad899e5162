"""The direct lane (node/directlane.py): device frames from the node's uvicorn
protocol to the front without ASGI, and the ASGI path that stays for other servers.

* in-process: the front under uvicorn with the node's protocol (direct lane) and
  with uvicorn's own websockets-sansio protocol (no ``iotnode.direct`` extension:
  the ASGI reader/writer path) answers the same frames the same way;
* a real ``python -m node.workers.web``: a device that reads none of its replies
  is paused (its socket stops being read) while another device is acked as usual,
  and once it reads it gets every reply and ack in order;
* replies and acks to one device stay in order.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import uvicorn
import websockets
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

from node import httpguard
from node.auth import issue_device_token
from node.config import Settings
from node.front.app import create_app
from node.httpguard import HTTP_PROTOCOL, WS_PROTOCOL
from node.protocol import Ack, ErrorReply, decode_reply
from tests.security.conftest import Server, client_frame, rss_bytes, running, ws_open
from tests.security.test_websocket_amplification import _worker
from tests.support import node_env, wait_until

pytestmark = pytest.mark.timeout(120)

SECRET = "test-secret-0123456789abcdef-0123456789"  # what tests.support.node_env sets
BINARY, TEXT = 0x2, 0x1


# ------------------------------------------------------------ in-process servers
class InProcess:
    def __init__(self, server: uvicorn.Server, app: Any, port: int) -> None:
        self.server, self.app, self.port = server, app, port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ingest"

    @property
    def stats(self) -> Any:
        return self.app.state.front.stats


def _serve(tmp_path: Path, ws: str) -> Iterator[InProcess]:
    env = node_env(tmp_path / "data", NODE_MAX_MESSAGE_BYTES="4096", NODE_LOG_LEVEL="warning")
    settings = Settings.from_env(env)
    # create_app points the "iotnode" and "node" loggers at their own handler (no
    # propagation, NODE_LOG_LEVEL) as in a worker; in this test process that would hide
    # every later test's log records from caplog: put them back afterwards.
    saved = {
        name: (lg.level, lg.propagate, list(lg.handlers))
        for name in ("iotnode", "node")
        for lg in [logging.getLogger(name)]
    }
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        loop="asyncio",
        http=HTTP_PROTOCOL,
        ws=ws,
        ws_max_size=settings.max_message_bytes,
        ws_per_message_deflate=False,
        ws_ping_interval=None,
        lifespan="on",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 15, what="the in-process front to start")
        yield InProcess(server, app, port)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        for name, (level, propagate, handlers) in saved.items():
            lg = logging.getLogger(name)
            lg.setLevel(level)
            lg.propagate = propagate
            lg.handlers[:] = handlers


@pytest.fixture(params=["direct", "asgi"])
def in_process(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[InProcess]:
    ws = WS_PROTOCOL if request.param == "direct" else "websockets-sansio"  # uvicorn's own
    yield from _serve(tmp_path, ws)


def _headers(device: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_device_token(SECRET, device, ttl=600)}"}


def test_the_front_answers_the_same_on_the_direct_lane_and_on_the_asgi_path(in_process: InProcess) -> None:
    split_before = httpguard.fast_lanes
    with sync_connect(in_process.url, additional_headers=_headers("dev-1"), open_timeout=10) as ws:
        ws.send(msgpack.packb({"seq": 1, "data": {"t": 21.5}}))
        assert decode_reply(ws.recv(timeout=10)) == Ack(1, True)
        ws.send('{"seq": 2}')
        reply = decode_reply(ws.recv(timeout=10))
        assert isinstance(reply, ErrorReply) and (reply.seq, reply.binary) == (2, False)
        ws.send('{"seq": 3, "data": null}')
        assert decode_reply(ws.recv(timeout=10)) == Ack(3, False)
        ws.send(b"\x00" * 5000)  # over NODE_MAX_MESSAGE_BYTES
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    stats = in_process.stats
    wait_until(lambda: stats.errors["oversize"] == 1, 5, what="the oversize frame to be counted")
    assert stats.errors["missing_data"] == 1
    assert (stats.received, stats.acked) == (2, 2)
    # only the node's own protocol offers the lane; uvicorn's gets the ASGI reader and writer
    assert stats.direct == (1 if in_process.server.config.ws == WS_PROTOCOL else 0)
    # and on the lane, data frames are split by the protocol itself (websockets: the rest)
    assert httpguard.fast_lanes - split_before == stats.direct


def test_a_device_that_closes_is_forgotten_on_both_paths(in_process: InProcess) -> None:
    async def go() -> None:
        for round_ in range(3):
            async with websockets.connect(in_process.url, additional_headers=_headers("dev-2")) as ws:
                await ws.send(msgpack.packb({"seq": round_, "data": round_}))
                assert decode_reply(await asyncio.wait_for(ws.recv(), 10)) == Ack(round_, True)

    asyncio.run(go())
    stats = in_process.stats
    wait_until(lambda: stats.open_connections == 0, 5, what="the connections to be forgotten")
    assert stats.acked == 3


# --------------------------------------------------------- a real web process
@pytest.fixture(scope="module")
def web() -> Iterator[Server]:
    # 1 worker; reading stops above 16 KiB unwritten (the limit the lane honours)
    with running("web", NODE_WS_MAX_UNWRITTEN_BYTES="16384", NODE_WS_PING_INTERVAL="0") as server:
        yield server


def _bad(seq: int) -> bytes:
    """A masked binary frame the front refuses with a long reply (echoing ``seq``)."""
    return client_frame(BINARY, msgpack.packb({"seq": seq, "data": 1, "ts": "x" * 60}))


def _good(seq: int) -> bytes:
    return client_frame(BINARY, msgpack.packb({"seq": seq, "data": seq}))


def _frames(data: bytes) -> tuple[list[bytes], bytes]:
    """Split unmasked server frames (payload < 126 bytes); returns (payloads, rest)."""
    out = []
    while len(data) >= 2:
        n = data[1] & 0x7F
        assert n < 126, data[:4]
        if len(data) < 2 + n:
            break
        assert data[0] == 0x82, data[:4]  # FIN + binary: replies in the device's encoding
        out.append(data[2 : 2 + n])
        data = data[2 + n :]
    return out, data


def test_a_device_that_reads_nothing_is_paused_and_others_are_acked_meanwhile(web: Server) -> None:
    worker = _worker(web)
    rss_before = rss_bytes(worker)
    lazy = ws_open(web, rcvbuf=4096)  # reads nothing until told: the server's writes back up
    try:
        lazy.setblocking(False)
        k, pending, stalled, stalled_since = 0, b"", False, 0.0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # one accepted message in ten, the rest refused
            if not pending:
                pending = _good(k) if k % 10 == 0 else _bad(k)
                k += 1
            try:
                pending = pending[lazy.send(pending) :]
                stalled_since = 0.0
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 1.0:
                    stalled = True  # the server stopped reading this device
                    break
                time.sleep(0.01)
        assert stalled, f"the server kept reading a device that reads nothing ({k} frames)"
        # ~100-byte replies to ~70-byte frames: what the worker parsed before it stopped
        # reading waits in the kernel's buffers and at most ~16 KiB of its own, not in
        # its memory (buffering every reply would be ~100 bytes x k, megabytes)
        grown = rss_bytes(worker) - rss_before
        assert grown < 4 << 20, f"the worker grew {grown} bytes for {k} frames"

        # another device meanwhile: acked as usual
        async def other() -> float:
            async with websockets.connect(web.ws_url, additional_headers={
                "Authorization": f"Bearer {web.token('other')}"}) as ws:  # fmt: skip
                worst = 0.0
                for seq in range(50):
                    t0 = time.monotonic()
                    await ws.send(msgpack.packb({"seq": seq, "data": seq}))
                    assert decode_reply(await asyncio.wait_for(ws.recv(), 5)) == Ack(seq, True)
                    worst = max(worst, time.monotonic() - t0)
                return worst

        assert asyncio.run(other()) < 2.0

        # the lazy device reads now: every reply and ack arrives, in order, and reading resumes
        total = k
        errors: list[int] = []
        last_ack = -1
        rest = b""
        deadline = time.monotonic() + 30
        while len(errors) < total - (total + 9) // 10 or last_ack < (total - 1) // 10 * 10:
            assert time.monotonic() < deadline, f"{len(errors)} refusals, last ack {last_ack} of {total}"
            readable, writable, _ = select.select([lazy], [lazy] if pending else [], [], 1.0)
            if writable:  # the rest of the frame cut short by the stall
                pending = pending[lazy.send(pending) :]
            if not readable:
                continue
            chunk = lazy.recv(65536)
            assert chunk, "the server closed the lazy device"
            payloads, rest = _frames(rest + chunk)
            for payload in payloads:
                reply = decode_reply(payload)
                if isinstance(reply, Ack):
                    assert reply.n > last_ack
                    last_ack = reply.n
                else:
                    assert reply.seq is not None
                    errors.append(reply.seq)
        assert errors == [k for k in range(total) if k % 10]  # every refusal, in order
        assert last_ack == (total - 1) // 10 * 10
    finally:
        lazy.close()


def test_replies_and_acks_to_one_device_stay_in_order(web: Server) -> None:
    async def go() -> list[Ack | ErrorReply]:
        headers = {"Authorization": f"Bearer {web.token('ordered')}"}
        async with websockets.connect(web.ws_url, additional_headers=headers) as ws:
            for seq in range(400):  # pipelined: refusals interleaved with accepted messages
                if seq % 3 == 1:
                    await ws.send(msgpack.packb({"seq": seq}))  # data missing: refused, seq echoed
                else:
                    await ws.send(msgpack.packb({"seq": seq, "data": seq}))
            replies: list[Ack | ErrorReply] = []
            while not replies or not (isinstance(replies[-1], Ack) and replies[-1].n == 399):
                replies.append(decode_reply(await asyncio.wait_for(ws.recv(), 10)))
            return replies

    replies = asyncio.run(go())
    refused = [r.seq for r in replies if isinstance(r, ErrorReply)]
    assert refused == [s for s in range(400) if s % 3 == 1]
    acked = -1
    for reply in replies:
        if isinstance(reply, Ack):
            assert reply.n > acked  # acks grow
            acked = reply.n
        else:
            assert reply.seq is not None
            # a refusal is answered before any ack that covers a message sent after it
            assert acked < reply.seq


# ------------------------------------------- the lane's frame splitter, raw frames
def _masked(first: int, payload: bytes, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """One client frame with header byte ``first`` (FIN/RSV/opcode), any length, masked."""
    n = len(payload)
    if n < 126:
        head = bytes([first, 0x80 | n])
    elif n < 65536:
        head = bytes([first, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _read_frames(sock: socket.socket, count: int, timeout: float = 10.0) -> list[tuple[int, bytes]]:
    """``count`` server frames as (first header byte, payload)."""
    sock.settimeout(timeout)
    data, out = b"", []
    while len(out) < count:
        while True:
            if len(data) >= 2:
                n, head = data[1] & 0x7F, 2
                if n == 126 and len(data) >= 4:
                    n, head = int.from_bytes(data[2:4], "big"), 4
                if n < 126 or head == 4:
                    if len(data) >= head + n:
                        out.append((data[0], data[head : head + n]))
                        data = data[head + n :]
                        break
            chunk = sock.recv(65536)
            assert chunk, f"closed after {out}"
            data += chunk
    return out


def test_frames_in_pieces_long_headers_fragments_and_pings_work_on_the_lane(web: Server) -> None:
    sock = ws_open(web)
    try:
        # a 300-byte message (16-bit length), sent a byte at a time
        big = _masked(0x82, msgpack.packb({"seq": 1, "data": "x" * 290}))
        for i in range(len(big)):
            sock.sendall(big[i : i + 1])
        assert decode_reply(_read_frames(sock, 1)[0][1]) == Ack(1, True)
        # a text message in two fragments (websockets joins them), then a ping: pong
        text = b'{"seq": 2, "data": "fragmented"}'
        sock.sendall(_masked(0x01, text[:10]) + _masked(0x80, text[10:]) + _masked(0x89, b"hi"))
        frames = _read_frames(sock, 2)
        assert (0x8A, b"hi") in frames  # the pong
        acks = [decode_reply(p.decode()) for first, p in frames if first == 0x81]
        assert acks == [Ack(2, False)]
        # several messages in one write, split anywhere
        burst = b"".join(_masked(0x82, msgpack.packb({"seq": s, "data": s})) for s in range(3, 40))
        sock.sendall(burst[:7])
        sock.sendall(burst[7:])
        seen = -1
        while seen < 39:
            (first, payload) = _read_frames(sock, 1)[0]
            reply = decode_reply(payload)
            assert isinstance(reply, Ack) and reply.n > seen
            seen = reply.n
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (_masked(0x81, b'{"seq": 1, "data": "\xff"}'), 1007),  # text that is not UTF-8
        (bytes([0x82, 5]) + b"hello", 1002),  # unmasked client frame
        (_masked(0xC2, b"\x80"), 1002),  # RSV1 without an extension
    ],
)
def test_bad_frames_close_the_lane_with_the_protocol_code(web: Server, frame: bytes, code: int) -> None:
    sock = ws_open(web)
    try:
        sock.sendall(frame)
        first, payload = _read_frames(sock, 1)[0]
        assert first == 0x88 and int.from_bytes(payload[:2], "big") == code
    finally:
        sock.close()


def test_a_large_frame_in_many_small_pieces_then_another_frame_is_acked_on_the_lane(web: Server) -> None:
    """The lane collects the pieces of a frame whose header it has read and parses it
    once it is whole (the pieces are joined once, not re-copied per piece); a frame
    that starts in the last piece is parsed right after it."""
    sock = ws_open(web)
    try:
        big = _masked(0x82, msgpack.packb({"seq": 1, "data": "y" * 20000}))
        after = _masked(0x82, msgpack.packb({"seq": 2, "data": 2}))
        stream = big + after[:5]
        for i in range(0, len(stream), 64):
            sock.sendall(stream[i : i + 64])
        sock.sendall(after[5:])
        seen = -1
        deadline = time.monotonic() + 10
        while seen < 2 and time.monotonic() < deadline:
            (_first, payload) = _read_frames(sock, 1)[0]
            reply = decode_reply(payload)
            assert isinstance(reply, Ack), reply
            seen = reply.n
        assert seen == 2
    finally:
        sock.close()
