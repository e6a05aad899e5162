"""Fixtures for the client tests: a real device front (uvicorn workers) or a whole node."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from node.auth import issue_device_token
from tests.support import Processes, iter_children, node_env, private_processes, start_web

PIPELINE = ("monitor", "router", "publisher", "store")


@dataclass
class Node:
    """Real node processes on loopback with a private data dir."""

    processes: Processes
    data_dir: Path
    env: dict[str, str]
    stages: tuple[str, ...] = ()
    log_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_dir = self.data_dir.parent

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.env['NODE_WEB_PORT']}/v1/ingest"

    @property
    def secret(self) -> str:
        return self.env["NODE_JWT_SECRET"]

    def token(self, device: str) -> str:
        return issue_device_token(self.secret, device)

    def start_front(self) -> None:
        start_web(self.processes, self.env, self.log_dir)

    def kill_front(self) -> None:
        """SIGKILL the whole front (parent and workers): every connection drops."""
        self.processes.kill("web", signal.SIGKILL)

    def kill_workers(self) -> int:
        """SIGKILL the uvicorn worker processes only; returns how many."""
        pids = list(iter_children(self.processes.procs["web"].pid))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def start_pipeline(self) -> None:
        for stage in self.stages:
            self.processes.start(stage, f"node.workers.{stage}", self.env, self.log_dir)

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.processes.log(name)[-2000:]}" for name in self.processes.procs)


@pytest.fixture
def front_factory(data_dir: Path, processes: Processes) -> Iterator[object]:
    def make(stages: tuple[str, ...] = (), **overrides: object) -> Node:
        node = Node(processes, data_dir, node_env(data_dir, **overrides), stages)
        node.start_pipeline()
        node.start_front()
        return node

    yield make


@pytest.fixture
def front(front_factory: object) -> Node:
    return front_factory()  # type: ignore[operator,no-any-return]


@pytest.fixture(scope="session")
def shared_front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One front for the tests that neither kill it nor reconfigure it (each uses
    its own device ids): saves a uvicorn start per test."""
    with private_processes(tmp_path_factory, "shared-front") as (_, data_dir, group):
        node = Node(group, data_dir, node_env(data_dir))
        node.start_front()
        yield node
