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

from node.auth import issue_device_token
from node.config import Settings
from node.front.app import create_app
from node.httpguard import HTTP_PROTOCOL, WS_PROTOCOL
from node.protocol import Ack, ErrorReply, decode_reply
from tests.security.conftest import Server, client_frame, running, ws_open
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


@pytest.fixture(params=["direct", "asgi"])
def in_process(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[InProcess]:
    ws = WS_PROTOCOL if request.param == "direct" else "websockets-sansio"  # uvicorn's own
    yield from _serve(tmp_path, ws)


def _headers(device: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_device_token(SECRET, device, ttl=600)}"}


def test_the_front_answers_the_same_on_the_direct_lane_and_on_the_asgi_path(in_process: InProcess) -> None:
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
        # ~100-byte replies to ~70-byte frames: reading stopped once the kernel's send
        # buffer (tcp_wmem's max, 4 MiB by default) and the 16 KiB limit were full
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
        assert k * 90 < wmem_max + (1 << 20), f"{k} frames taken"

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
