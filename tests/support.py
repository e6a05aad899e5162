"""Shared test helpers: free ports, real node processes, bounded waiting.

Everything here starts *real* processes (``python -m node.workers.X``) with a
private ``NODE_DATA_DIR`` and free loopback ports, and kills them on teardown.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one this process handed out before (node_env asks
    for several at once: the kernel may offer a just-released port twice)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no fresh free port after 100 tries")


def run_module(
    module: str, *args: str, env: Mapping[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m MODULE ARGS`` from the repository to completion, output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=dict(env),
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> object:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    def ok() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_until(ok, timeout, what=f"port {port}")


def node_env(data_dir: Path, **overrides: object) -> dict[str, str]:
    """An environment for node processes: private data dir, free ports, a fixed secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
    env.update(
        NODE_DATA_DIR=str(data_dir),
        NODE_WEB_PORT=str(free_port()),
        NODE_FANOUT_PORT=str(free_port()),
        NODE_METRICS_PORT_MONITOR=str(free_port()),
        NODE_METRICS_PORT_ROUTER=str(free_port()),
        NODE_METRICS_PORT_PUBLISHER=str(free_port()),
        NODE_METRICS_PORT_STORE=str(free_port()),
        NODE_JWT_SECRET="test-secret-0123456789abcdef-0123456789",
        NODE_WEB_WORKERS="2",
        NODE_INGRESS_RING_BYTES=str(4 << 20),
        NODE_FANIN_RING_BYTES=str(8 << 20),
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class Processes:
    """Starts node processes and guarantees they are gone after the test."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def start(
        self,
        name: str,
        module: str,
        env: Mapping[str, str],
        log_dir: Path,
        args: list[str] | None = None,
        prefix: list[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``python -m module args`` as ``name``; ``prefix`` runs it under a command that
        execs it (e.g. ``ip netns exec NS``: the process group is still the node's)."""
        log = log_dir / f"{name}.log"
        self.logs[name] = log
        fh = open(log, "ab")
        proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", module, *(args or [])],
            env=dict(env),
            cwd=str(REPO),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill workers with it
        )
        fh.close()
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL, group: bool = True) -> None:
        proc = self.procs[name]
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def log(self, name: str) -> str:
        path = self.logs.get(name)
        return path.read_text(errors="replace") if path and path.exists() else ""

    def stop_all(self) -> None:
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                self.kill(name, signal.SIGKILL)


@contextmanager
def private_processes(
    tmp_path_factory: pytest.TempPathFactory, basename: str
) -> Iterator[tuple[Path, Path, Processes]]:
    """For module- or session-scoped fixtures: ``(root, data_dir, processes)``, a fresh
    root for the logs with an empty ``root/data``; every process started in the group
    is killed on exit."""
    root = tmp_path_factory.mktemp(basename)
    data_dir = root / "data"
    data_dir.mkdir()
    group = Processes()
    try:
        yield root, data_dir, group
    finally:
        group.stop_all()


def device_handshake_succeeds(url: str, token: str, timeout: float = 2.0) -> bool:
    """True when a device WebSocket handshake with ``token`` is accepted at ``url``."""
    import websockets

    async def probe() -> bool:
        try:
            async with websockets.connect(
                url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=timeout
            ):
                return True
        except (TimeoutError, OSError, websockets.WebSocketException):
            return False

    return asyncio.run(probe())


def start_web(
    processes: Processes, env: Mapping[str, str], log_dir: Path, name: str = "web", timeout: float = 30.0
) -> subprocess.Popen[bytes]:
    """Start the device front (``python -m node.workers.web``) as ``name`` and return once
    a device handshake succeeds (its workers serve); fail with its log if it exits first
    or is not ready within ``timeout`` s."""
    from node.auth import issue_device_token

    proc = processes.start(name, "node.workers.web", env, log_dir)
    url = f"ws://127.0.0.1:{env['NODE_WEB_PORT']}/v1/ingest"
    token = issue_device_token(env["NODE_JWT_SECRET"], "readiness-probe", ttl=600)
    try:
        wait_until(
            lambda: proc.poll() is not None or device_handshake_succeeds(url, token),
            timeout,
            what=f"{name} ready",
        )
    except AssertionError:
        raise AssertionError(
            f"{name} did not get ready within {timeout} s:\n{processes.log(name)[-3000:]}"
        ) from None
    if proc.poll() is not None:
        raise AssertionError(f"{name} exited with {proc.returncode}:\n{processes.log(name)[-3000:]}")
    return proc


def ring_envelopes(path: Path | str, capacity: int = 4 << 20, pop: bool = False) -> list[Any]:
    """Every record envelope in a ring file, decoded (the caller must be its only
    consumer: a running monitor would make this raise ConsumerBusy).  With ``pop``
    the records are released as they are read."""
    from node.record import unpack_record
    from node.ring import Ring

    ring = Ring.open(Path(path), capacity=capacity)
    try:
        reader = ring.reader()
        try:
            out: list[Any] = []
            pos = ring.head
            for _ in range(100_000):
                batch = reader.read(pos, max_records=4096)
                if not batch:
                    break
                out.extend(unpack_record(r.payload) for r in batch)
                pos = batch[-1].end
                if pop:
                    reader.pop(pos)
            return out
        finally:
            reader.close()
    finally:
        ring.close()


def iter_children(pid: int) -> Iterator[int]:
    """Direct children of ``pid`` (from /proc), e.g. uvicorn's worker processes."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            yield int(entry.name)
