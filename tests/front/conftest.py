"""Fixtures for the device front: a real ``python -m node.workers.web`` (uvicorn,
2 worker processes) on a free loopback port with a private data dir."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import websockets

from node.auth import issue_device_token
from tests.support import Processes, node_env, wait_until

SECRET = "test-secret-0123456789abcdef"  # what tests.support.node_env sets


@dataclass
class Front:
    env: dict[str, str]
    port: int
    data_dir: Path
    processes: Processes

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ingest"

    def token(self, device_id: str, ttl: float | None = None) -> str:
        return issue_device_token(SECRET, device_id, ttl=ttl)

    def connect(self, device_id: str, **kwargs: object) -> websockets.asyncio.client.connect:
        headers = {"Authorization": f"Bearer {self.token(device_id)}"}
        return websockets.connect(self.url, additional_headers=headers, open_timeout=20, **kwargs)

    def log(self) -> str:
        return self.processes.log("web")


def _ready(url: str, token: str) -> bool:
    async def probe() -> bool:
        try:
            async with websockets.connect(
                url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=2
            ):
                return True
        except (OSError, asyncio.TimeoutError, websockets.WebSocketException):
            return False

    return asyncio.run(probe())


def start_front(data_dir: Path, log_dir: Path, processes: Processes, name: str = "web", **env: object) -> Front:
    environment = node_env(data_dir, **env)
    processes.start(name, "node.workers.web", environment, log_dir)
    front = Front(environment, int(environment["NODE_WEB_PORT"]), data_dir, processes)
    token = front.token("readiness-probe")
    try:
        wait_until(lambda: _ready(front.url, token) or processes.procs[name].poll() is not None, timeout=30,
                   what="web front ready")
    except AssertionError:
        raise AssertionError(f"web did not start:\n{processes.log(name)}") from None
    if processes.procs[name].poll() is not None:
        raise AssertionError(f"web exited with {processes.procs[name].returncode}:\n{processes.log(name)}")
    return front


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    """One front shared by the tests of a module (start-up costs ~1-2 s)."""
    root = tmp_path_factory.mktemp("front")
    data_dir = root / "data"
    data_dir.mkdir()
    group = Processes()
    try:
        yield start_front(data_dir, root, group)
    finally:
        group.stop_all()


@pytest.fixture(scope="session", autouse=True)
def _raise_nofile() -> None:
    """1,000+ client sockets in the test process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
