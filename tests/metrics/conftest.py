"""A whole node started the way ``honcho start`` starts it: each Procfile command
in ``sh -c`` (so ``web`` gets a wiped ``PROMETHEUS_MULTIPROC_DIR`` exactly as in
production), a private data dir, free loopback ports; plus scraping helpers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from node.auth import issue_device_token
from tests.support import (
    REPO,
    Processes,
    iter_children,
    node_env,
    private_processes,
    wait_for_port,
    wait_until,
)

SECRET = "test-secret-0123456789abcdef-0123456789"  # what tests.support.node_env sets
PROCESSES = ("web", "monitor", "router", "publisher", "store", "fanout")
PORT_VAR = {
    "web": "NODE_WEB_PORT",
    "fanout": "NODE_FANOUT_PORT",
    "monitor": "NODE_METRICS_PORT_MONITOR",
    "router": "NODE_METRICS_PORT_ROUTER",
    "publisher": "NODE_METRICS_PORT_PUBLISHER",
    "store": "NODE_METRICS_PORT_STORE",
}


def procfile() -> dict[str, str]:
    commands = {}
    for line in (REPO / "Procfile").read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() and not name.startswith("#"):
            commands[name.strip()] = command.strip()
    return commands


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a text exposition: (sample name, labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
    "summary": ("", "_sum", "_count"),
    "unknown": ("",),
}


def exported_names(text: str) -> set[str]:
    """Every sample name a text exposition declares, samples present or not (a labelled
    counter that has counted nothing yet still has its HELP/TYPE lines)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def label_values(samples: Samples, name: str, label: str, **labels: str) -> set[str]:
    want = set(labels.items())
    return {
        dict(ls)[label] for (n, ls), _ in samples.items() if n == name and want <= ls and label in dict(ls)
    }


@dataclass
class Node:
    env: dict[str, str]
    processes: Processes
    log_dir: Path
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=10))

    def port(self, name: str) -> int:
        return int(self.env[PORT_VAR[name]])

    def scrape_text(self, name: str) -> str:
        response = self.client.get(f"http://127.0.0.1:{self.port(name)}/metrics")
        response.raise_for_status()
        return response.text

    def scrape(self, name: str) -> Samples:
        return parse(self.scrape_text(name))

    def scrape_all(self) -> dict[str, Samples]:
        return {name: self.scrape(name) for name in PROCESSES}

    def wait_metric(self, name: str, predicate, timeout: float = 20.0, what: str = "") -> Samples:  # type: ignore[no-untyped-def]
        found: list[Samples] = []

        def check() -> bool:
            samples = self.scrape(name)
            found[:] = [samples]
            return bool(predicate(samples))

        wait_until(check, timeout, interval=0.1, what=what or f"metric condition on {name}")
        return found[0]

    @property
    def ingest_url(self) -> str:
        return f"ws://127.0.0.1:{self.port('web')}/v1/ingest"

    def connect(self, device_id: str) -> websockets.asyncio.client.connect:
        token = issue_device_token(SECRET, device_id)
        return websockets.connect(
            self.ingest_url,
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=20,
            ping_interval=None,
        )

    def web_workers(self) -> list[int]:
        """uvicorn's spawned workers (not multiprocessing's resource tracker)."""
        pids = []
        for pid in iter_children(self.processes.procs["web"].pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                pids.append(pid)
        return sorted(pids)

    def signal(self, name: str, sig: int) -> None:
        os.killpg(self.processes.procs[name].pid, sig)


def start_node(
    data_dir: Path,
    log_dir: Path,
    processes: Processes,
    names: tuple[str, ...] = PROCESSES,
    **overrides: object,
) -> Node:
    env = node_env(data_dir, **overrides)
    # The Procfile says "python": make it this interpreter.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    commands = procfile()
    for name in names:
        log = log_dir / f"{name}.log"
        processes.logs[name] = log
        with open(log, "ab") as fh:
            processes.procs[name] = subprocess.Popen(
                ["sh", "-c", "exec " + commands[name]],
                env=env,
                cwd=str(REPO),
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    node = Node(env, processes, log_dir)
    for name in names:
        try:
            wait_for_port(node.port(name), timeout=30)
        except AssertionError:
            raise AssertionError(f"{name} did not listen:\n{processes.log(name)}") from None
    workers = int(env["NODE_WEB_WORKERS"])
    if "web" in names:
        wait_until(lambda: len(node.web_workers()) == workers, 20, what="web workers")
        # a worker counts itself once its app is built (its pid exists a moment before)
        node.wait_metric(
            "web", lambda s: value(s, "iotnode_web_workers") == workers, 20, "web workers counted"
        )
    return node


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One whole node shared by a module's tests (start-up costs a few seconds)."""
    with private_processes(tmp_path_factory, "node") as (root, data_dir, group):
        node = start_node(data_dir, root, group)
        try:
            yield node
        finally:
            node.client.close()
            for name in PROCESSES:  # SIGCONT first: a test may have stopped one
                proc = group.procs.get(name)
                if proc is not None and proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass


def send_messages(
    node: Node, devices: list[str], per_device: int, start_seq: int = 0, timeout: float = 60
) -> None:
    """Each device sends ``per_device`` JSON messages and waits for the ack of the last."""

    async def device(device_id: str) -> None:
        async with node.connect(device_id) as ws:
            for seq in range(start_seq, start_seq + per_device):
                await ws.send(f'{{"seq": {seq}, "data": {{"v": {seq}}}}}')
            last = -1
            while last < start_seq + per_device - 1:
                reply = await asyncio.wait_for(ws.recv(), 20)
                assert '"ack"' in reply, reply
                last = int(reply.split(":")[1].strip(" }"))

    async def run() -> None:
        await asyncio.wait_for(asyncio.gather(*(device(d) for d in devices)), timeout)

    asyncio.run(run())
