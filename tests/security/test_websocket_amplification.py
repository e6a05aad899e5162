"""Finding 3 of issue 14: a device with a valid token cannot make a worker queue
unbounded events or unwritten bytes.

* a burst of tiny frames (6 bytes each) is parsed slice by slice, and reading stops
  while NODE_WS_MAX_QUEUED_FRAMES wait for the app;
* a ping flood from a device that reads nothing stops being read once
  NODE_WS_MAX_UNWRITTEN_BYTES of pongs wait;
* the web listener has TCP_USER_TIMEOUT: a device that stops reading is aborted.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.security.conftest import (
    Server,
    client_frame,
    rss_bytes,
    running,
    tcp_state,
    ws_open,
)
from tests.support import iter_children, wait_until

BINARY, PING = 0x2, 0x9
MIB = 1 << 20


@pytest.fixture(scope="module")
def web() -> Iterator[Server]:
    with running("web", NODE_TCP_USER_TIMEOUT_MS="2000", NODE_WS_PING_INTERVAL="0") as server:
        yield server


def _worker(server: Server) -> int:
    """The serving process: with NODE_WEB_WORKERS=1 uvicorn serves in the web process itself."""
    pid = server.processes.procs["web"].pid
    children = list(iter_children(pid))
    return children[0] if children else pid


def _push(sock: socket.socket, chunk: bytes, total: int, budget: float) -> int:
    """Send ``chunk`` repeatedly, non-blocking, up to ``total`` bytes or ``budget`` seconds;
    the bytes the server took (its socket stops accepting once it stops reading)."""
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + budget
    stalled_since = None
    view = memoryview(chunk)
    offset = 0  # a partial send continues where it stopped: frames stay whole
    while sent < total and time.monotonic() < deadline:
        try:
            n = sock.send(view[offset:])
            sent += n
            offset = (offset + n) % len(chunk)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 1.0:
                break  # the server stopped reading
            time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            break
    sock.setblocking(True)
    return sent


def test_a_burst_of_tiny_frames_does_not_queue_events_without_bound(web: Server) -> None:
    worker = _worker(web)
    before = rss_bytes(worker)
    socks = [ws_open(web, rcvbuf=65536) for _ in range(4)]
    try:
        burst = client_frame(BINARY) * (256 * 1024 // 6)  # ~43,000 empty frames per 256 KiB
        taken = [_push(s, burst, 2 * MIB, 4.0) for s in socks]
        time.sleep(0.5)
        grown = rss_bytes(worker) - before
    finally:
        for s in socks:
            s.close()
    # unbounded (before issue 14): ~5 MiB of queued events per MiB of frames
    assert grown < 16 * MIB, f"worker grew {grown / MIB:.0f} MiB for {sum(taken) / MIB:.0f} MiB of frames"


def test_a_ping_flood_that_never_reads_its_pongs_stops_being_read(web: Server) -> None:
    worker = _worker(web)
    before = rss_bytes(worker)
    sock = ws_open(web, rcvbuf=65536)
    try:
        pings = client_frame(PING, b"p" * 125) * 2000  # 262 KB of pings -> 254 KB of pongs
        taken = _push(sock, pings, 64 * MIB, 15.0)
        grown = rss_bytes(worker) - before
    finally:
        sock.close()
    assert taken < 16 * MIB, f"the worker kept reading pings: {taken / MIB:.0f} MiB taken"
    assert grown < 32 * MIB, f"worker grew {grown / MIB:.0f} MiB"


def test_a_device_that_stops_reading_is_aborted_by_tcp_user_timeout(web: Server) -> None:
    sock = ws_open(web, rcvbuf=65536)
    try:
        pings = client_frame(PING, b"p" * 125) * 2000
        _push(sock, pings, 64 * MIB, 10.0)  # the server's pongs fill our receive window
        # NODE_TCP_USER_TIMEOUT_MS=2000: the kernel gives up on its zero-window probes
        wait_until(lambda: tcp_state(sock) == 7, 15, interval=0.1, what="the server to abort the connection")
    finally:
        sock.close()
