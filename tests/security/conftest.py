"""Fixtures for the hostile-client suite: real ``web`` and ``fanout`` processes
(private data dirs, free loopback ports) and raw-socket helpers.

Every test here plays a hostile client against a running server and checks what a
well-behaved server must do (answer, close, bound memory) -- see docs/security.md.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.auth import issue_client_token, issue_device_token
from tests.support import Processes, node_env, start_web, wait_for_port

SECRET = "security-test-secret-0123456789abcdef-xyz"  # >= 32 bytes


@dataclass
class Server:
    """A running web or fanout server."""

    kind: str  # "web" | "fanout"
    env: dict[str, str]
    port: int
    processes: Processes
    data_dir: Path

    @property
    def path(self) -> str:
        return "/v1/ingest" if self.kind == "web" else "/v1/stream?device=d1"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.path}"

    def token(self, device: str = "d1", ttl: float | None = 3600) -> str:
        if self.kind == "web":
            return issue_device_token(SECRET, device, ttl=ttl)
        return issue_client_token(SECRET, [device], ttl=ttl)

    def log(self) -> str:
        return self.processes.log(self.kind)


def short_dir(prefix: str) -> Path:
    """A data dir short enough for the ipc:// paths (107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def start_server(kind: str, processes: Processes, **env: object) -> Server:
    """Start ``python -m node.workers.<kind>`` (web: 1 worker unless told) and wait until it serves."""
    data_dir = short_dir(f"sec-{kind}-")
    env.setdefault("NODE_WEB_WORKERS", "1")
    environment = node_env(data_dir, NODE_JWT_SECRET=SECRET, **env)
    if kind == "web":
        start_web(processes, environment, data_dir, name="web")
        port = int(environment["NODE_WEB_PORT"])
    else:
        port = int(environment["NODE_FANOUT_PORT"])
        processes.start("fanout", "node.workers.fanout", environment, data_dir)
        try:
            wait_for_port(port)
        except AssertionError:
            raise AssertionError(f"fanout did not start:\n{processes.log('fanout')}") from None
    return Server(kind, environment, port, processes, data_dir)


@contextmanager
def running(kind: str, **env: object) -> Iterator[Server]:
    processes = Processes()
    server = None
    try:
        server = start_server(kind, processes, **env)
        yield server
    finally:
        processes.stop_all()
        if server is not None:
            shutil.rmtree(server.data_dir, ignore_errors=True)


# ------------------------------------------------------------------ raw sockets
def raw_connect(port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_until_closed(sock: socket.socket, timeout: float, limit: int = 1 << 20) -> tuple[bytes, float]:
    """What the server sends until it closes (or ``timeout`` passes: AssertionError);
    returns (bytes, seconds it took)."""
    start = time.monotonic()
    data = b""
    while len(data) < limit:
        left = timeout - (time.monotonic() - start)
        if left <= 0:
            raise AssertionError(f"server did not close within {timeout} s (got {data[:200]!r})")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def status_of(response: bytes) -> int | None:
    if not response.startswith(b"HTTP/1."):
        return None
    return int(response.split(b" ", 2)[1])


def upgrade_request(path: str, host: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture(scope="session", autouse=True)
def _raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def ws_open(server: Server, source: str = "127.0.0.1", rcvbuf: int | None = None) -> socket.socket:
    """A raw socket past a successful WebSocket handshake with ``server`` (token in the header)."""
    sock = socket.socket()
    if rcvbuf is not None:  # before connect: it bounds the window the kernel offers
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(upgrade_request(server.path, "x", {"Authorization": f"Bearer {server.token()}"}))
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        if not chunk:
            break
        response += chunk
    assert status_of(response) == 101, response[:300]
    return sock


def client_frame(opcode: int, payload: bytes = b"") -> bytes:
    """One masked client frame (mask key 0: the payload goes as is), payload < 126 bytes."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def tcp_state(sock: socket.socket) -> int:
    """Linux tcpi_state of a socket (1 established, 7 closed)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
