"""Fanout test helpers: a real fanout process, the test playing the publisher.

``Publisher`` binds a real XPUB socket at the node's ``pub_endpoint`` (an XPUB sends
exactly like the publisher's PUB, and also shows the test the subscriptions the
fanout makes).  ``FanoutNode`` starts ``python -m node.workers.fanout`` with a
private, short data dir (ipc:// paths are limited to 107 bytes) and free ports.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect

from node import wire
from node.auth import issue_client_token
from node.config import Settings
from node.record import pack_record
from tests.support import Processes, node_env, wait_for_port

N = TypeVar("N")

RING_ID = b"F" * 16
# >= 32 bytes, so PyJWT never warns (pytest turns warnings into errors).
SECRET = "fanout-test-secret-" + "0123456789abcdef" * 2
TIMEOUT = 10.0  # seconds any single expected event may take


class Publisher:
    """The test's stand-in for the publisher stage (real ZeroMQ, node.wire format)."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.SNDHWM, 1_000_000)  # the test never drops on its side
        self.sock.setsockopt(zmq.LINGER, 0)
        # Report every subscribe, also one for a topic a dead, not yet reaped
        # connection still holds (a SIGKILLed fanout reconnecting).
        self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.sock.bind(endpoint)
        self.events: list[bytes] = []  # subscription messages seen: b"\x01topic" / b"\x00topic"
        self.pos = 0

    def publish(
        self, device: str, seq: int, data: Any = None, ts: float | None = None, received_at: float = 1.5
    ) -> None:
        record = pack_record(device, seq, ts, received_at, data)
        end = self.pos + 64
        self.sock.send_multipart(
            wire.encode_published(wire.device_topic(device), RING_ID, self.pos, end, record)
        )
        self.pos = end

    def publish_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def _collect(self, timeout: float) -> None:
        if self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            while True:
                try:
                    self.events.append(self.sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    return

    def wait_event(self, event: bytes, timeout: float = TIMEOUT, after: int = 0) -> int:
        """Wait (bounded) until subscription message ``event`` arrives; its index in ``events``."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(after, len(self.events)):
                if self.events[i] == event:
                    return i
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {event!r} from the fanout within {timeout}s; saw {self.events[-10:]!r}"
                )
            self._collect(min(left, 0.1))

    def wait_subscribed(self, device: str | None) -> int:
        """``device=None``: the everything subscription (empty topic)."""
        topic = b"" if device is None else wire.device_topic(device)
        return self.wait_event(b"\x01" + topic)

    def quiet_events(self, seconds: float) -> list[bytes]:
        """Subscription messages arriving within ``seconds`` (to check that none came)."""
        start = len(self.events)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._collect(min(left, 0.05))
        return self.events[start:]

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


class FanoutNode:
    """A running fanout process and what a test needs to talk to it."""

    def __init__(self, processes: Processes, data_dir: Path, name: str = "fanout", **env: object) -> None:
        self.processes = processes
        self.name = name
        self.data_dir = data_dir
        self.env = node_env(data_dir, NODE_JWT_SECRET=SECRET, **env)
        self.settings = Settings.from_env(self.env)
        self.port = self.settings.fanout_port
        self.url = f"ws://127.0.0.1:{self.port}/v1/stream"
        self.publisher = Publisher(self.settings.pub_endpoint)
        self.proc = processes.start(name, "node.workers.fanout", self.env, data_dir)
        try:
            wait_for_port(self.port)
        except AssertionError:
            raise AssertionError(f"fanout did not start:\n{processes.log(name)}") from None

    def token(self, devices: list[str], ttl: float | None = None) -> str:
        return issue_client_token(SECRET, devices, ttl=ttl)

    def stream_url(self, devices: list[str], token: str | None = None) -> str:
        query = "&".join(f"device={d}" for d in devices)
        if token is not None:
            query += ("&" if query else "") + f"token={token}"
        return f"{self.url}?{query}" if query else self.url

    def connect(self, devices: list[str], token: str | None = None, **kwargs: Any) -> Any:
        """``async with node.connect([...]) as ws`` -- token defaults to one allowing exactly ``devices``."""
        if token is None:
            token = self.token(devices)
        kwargs.setdefault("open_timeout", TIMEOUT)
        kwargs.setdefault("compression", None)
        return connect(self.stream_url(devices, token), **kwargs)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Samples of ``/metrics`` parsed by prometheus_client: {(name, labels): value}."""
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=TIMEOUT).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.processes.kill(self.name, sig, group=False)
        return self.proc.wait(timeout=TIMEOUT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.processes.kill(self.name, signal.SIGKILL)
        self.publisher.close()


async def receive(ws: ClientConnection, count: int, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    """Exactly ``count`` JSON frames (each within ``timeout`` s of the previous one)."""
    frames = []
    for _ in range(count):
        text = await asyncio.wait_for(ws.recv(), timeout)
        assert isinstance(text, str), f"expected a text frame, got {type(text).__name__}"
        frames.append(json.loads(text))
    return frames


async def nothing_more(ws: ClientConnection, seconds: float = 0.3) -> None:
    """Assert that no frame arrives within ``seconds``."""
    try:
        extra = await asyncio.wait_for(ws.recv(), seconds)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected extra frame: {extra!r}")


def keys(frames: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(f["device"], f["seq"]) for f in frames]


def short_data_dir() -> Path:
    # tmp_path can exceed the 107-byte ipc:// limit once "/pub.sock" is added.
    return Path(tempfile.mkdtemp(prefix="fo-", dir="/tmp"))


@pytest.fixture
def private_dir() -> Iterator[Path]:
    path = short_data_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def private_node(factory: Callable[[Path, Processes], N], release: Callable[[N], object]) -> Iterator[N]:
    """A node built by ``factory(data_dir, processes)`` in a short private data dir;
    ``release(node)`` runs first on exit, then every process is stopped and the dir removed."""
    path = short_data_dir()
    processes = Processes()
    node = None
    try:
        node = factory(path, processes)
        yield node
    finally:
        if node is not None:
            release(node)
        processes.stop_all()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def fanout() -> Iterator[FanoutNode]:
    """One fanout process shared by a test module; tests use their own device ids."""
    with private_node(lambda path, processes: FanoutNode(processes, path), FanoutNode.close) as node:
        yield node


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}-{os.getpid()}"
