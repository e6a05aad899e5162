"""Finding 1 of issue 14: the HTTP handshake of both servers is bounded.

* request line + headers over NODE_MAX_HEADER_BYTES -> HTTP 431, connection closed;
* nothing (or a trickle) for NODE_HANDSHAKE_TIMEOUT after accept -> closed (408);
* connections over NODE_MAX_CONNECTIONS / NODE_MAX_CONNECTIONS_PER_IP -> HTTP 503.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest
import websockets

from tests.security.conftest import (
    Server,
    raw_connect,
    read_until_closed,
    running,
    status_of,
    upgrade_request,
)

DEADLINE = 1.0  # NODE_HANDSHAKE_TIMEOUT of these servers
SLACK = 3.0  # scheduling on a shared 2-core machine


@pytest.fixture(scope="module", params=["web", "fanout"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    with running(request.param, NODE_HANDSHAKE_TIMEOUT=str(DEADLINE)) as s:
        yield s


def _send_all_until_refused(sock: socket.socket, chunks: Iterator[bytes], budget: float = 20.0) -> int:
    """Send chunks until the server stops taking them; return the bytes sent."""
    sent = 0
    deadline = time.monotonic() + budget
    sock.settimeout(1.0)
    for chunk in chunks:
        if time.monotonic() > deadline:
            break
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            break
        sent += len(chunk)
    return sent


def test_a_20_mib_request_line_is_refused_with_431_after_at_most_16_kib(server: Server) -> None:
    sock = raw_connect(server.port)
    try:
        head = f"GET {server.path}&x=".encode()

        def chunks() -> Iterator[bytes]:
            yield head
            for _ in range(320):  # 20 MiB of URL in 64 KiB pieces
                yield b"a" * 65536

        sent = _send_all_until_refused(sock, chunks())
        response, _ = read_until_closed(sock, 10)
    finally:
        sock.close()
    assert status_of(response) == 431, response[:200]
    assert sent < 20 << 20, "the server read the whole 20 MiB line"


def test_100000_headers_are_refused_with_431(server: Server) -> None:
    sock = raw_connect(server.port)
    try:

        def chunks() -> Iterator[bytes]:
            yield f"GET {server.path} HTTP/1.1\r\nHost: x\r\n".encode()
            for block in range(100):
                yield b"".join(b"X-H%d: v\r\n" % (block * 1000 + i) for i in range(1000))

        _send_all_until_refused(sock, chunks())
        response, _ = read_until_closed(sock, 10)
    finally:
        sock.close()
    assert status_of(response) == 431, response[:200]


def test_headers_just_under_the_cap_still_upgrade(server: Server) -> None:
    filler = {f"X-Filler-{i}": "f" * 2000 for i in range(6)}  # 12 KB of headers: below 16 KiB
    url = server.ws_url

    async def go() -> None:
        headers = {"Authorization": f"Bearer {server.token()}", **filler}
        async with websockets.connect(url, additional_headers=headers, open_timeout=10, max_size=None):
            pass

    asyncio.run(go())


def test_a_silent_connection_is_closed_at_the_handshake_deadline(server: Server) -> None:
    sock = raw_connect(server.port)
    try:
        response, took = read_until_closed(sock, DEADLINE + SLACK + 2)
    finally:
        sock.close()
    assert DEADLINE - 0.2 <= took <= DEADLINE + SLACK
    assert status_of(response) in (408, None)


def test_a_trickled_request_is_closed_at_the_deadline_although_bytes_keep_coming(server: Server) -> None:
    sock = raw_connect(server.port)
    request = upgrade_request(server.path, "x")
    start = time.monotonic()
    closed_after = None
    try:
        sock.settimeout(0.05)
        for i in range(len(request) - 4):  # never the final CRLF CRLF
            if time.monotonic() - start > DEADLINE + SLACK + 2:
                break
            try:
                sock.send(request[i : i + 1])
                data = sock.recv(4096)
            except TimeoutError:
                time.sleep(0.05)
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - start
                break
            if data == b"" or status_of(data) is not None:
                closed_after = time.monotonic() - start
                break
    finally:
        sock.close()
    assert closed_after is not None, "the trickling connection was never closed"
    assert closed_after <= DEADLINE + SLACK


def test_an_accepted_websocket_outlives_the_handshake_deadline(server: Server) -> None:
    # A complete, well-formed upgrade with a valid token is answered at once ...
    async def go() -> None:
        headers = {"Authorization": f"Bearer {server.token()}"}
        async with websockets.connect(server.ws_url, additional_headers=headers, open_timeout=10):
            await asyncio.sleep(DEADLINE + 0.5)  # ... and the deadline does not end an accepted connection

    asyncio.run(go())


def test_connections_over_the_per_ip_and_total_limits_get_503() -> None:
    with running("web", NODE_MAX_CONNECTIONS="5", NODE_MAX_CONNECTIONS_PER_IP="3") as web:
        held = [raw_connect(web.port, "127.0.0.1") for _ in range(3)]
        try:
            time.sleep(0.3)  # let the server accept them
            over_ip = raw_connect(web.port, "127.0.0.1")
            response, _ = read_until_closed(over_ip, 5)
            over_ip.close()
            assert status_of(response) == 503, response
            held += [raw_connect(web.port, "127.0.0.2") for _ in range(2)]  # another address: room
            time.sleep(0.3)
            over_total = raw_connect(web.port, "127.0.0.3")
            response, _ = read_until_closed(over_total, 5)
            over_total.close()
            assert status_of(response) == 503, response
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.5)  # closed connections free their slots
        sock = raw_connect(web.port, "127.0.0.1")
        try:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(5)
            assert status_of(sock.recv(4096)) == 200
        finally:
            sock.close()
        assert "too many connections" in web.log()
