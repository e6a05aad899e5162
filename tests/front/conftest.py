"""Fixtures for the device front: a real ``python -m node.workers.web`` (uvicorn,
2 worker processes) on a free loopback port with a private data dir."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import websockets

from node.auth import issue_device_token
from tests.support import Processes, node_env, private_processes, start_web

SECRET = "test-secret-0123456789abcdef-0123456789"  # what tests.support.node_env sets


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


def start_front(
    data_dir: Path, log_dir: Path, processes: Processes, name: str = "web", **env: object
) -> Front:
    environment = node_env(data_dir, **env)
    start_web(processes, environment, log_dir, name)
    return Front(environment, int(environment["NODE_WEB_PORT"]), data_dir, processes)


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    """One front shared by the tests of a module (start-up costs ~1-2 s)."""
    with private_processes(tmp_path_factory, "front") as (root, data_dir, group):
        yield start_front(data_dir, root, group)


@pytest.fixture(scope="session", autouse=True)
def _raise_nofile() -> None:
    """1,000+ client sockets in the test process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
