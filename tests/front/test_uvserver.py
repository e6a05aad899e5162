"""node.uvserver: uvicorn without its timer ticks (issue 16).

A :class:`node.uvserver.Server` runs in a thread of this process with a tiny ASGI app
(its thread's context switches are read from /proc); the supervisor is checked on a
real ``python -m node.workers.web`` with two workers.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from node.uvserver import HEALTHCHECK_INTERVAL, LazyHeaders, Server
from tests.front.conftest import start_front
from tests.support import Processes, iter_children, wait_until


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _switches(tid: int) -> int:
    """Voluntary context switches of one thread of this process (each is a wake-up)."""
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches for thread {tid}")


class Running:
    def __init__(self, server: uvicorn.Server, thread: threading.Thread, port: int) -> None:
        self.server, self.thread, self.port = server, thread, port
        self.tid = 0

    def get(self) -> tuple[bytes, dict[str, str]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=5) as resp:
            return resp.read(), dict(resp.headers)


def _serve(server_class: type[uvicorn.Server]) -> Iterator[Running]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        _app, lifespan="on", log_level="warning", loop="asyncio", headers=[("x-node", "1")]
    )
    server = server_class(config)
    running = Running(server, threading.Thread(), port)

    def target() -> None:
        running.tid = threading.get_native_id()
        server.run(sockets=[sock])

    running.thread = threading.Thread(target=target, daemon=True)
    running.thread.start()
    try:
        wait_until(lambda: server.started, 10, what="the server to start")
        yield running
    finally:
        server.should_exit = True
        running.thread.join(10)
        sock.close()


@pytest.fixture
def quiet() -> Iterator[Running]:
    yield from _serve(Server)


def test_an_idle_server_thread_does_not_wake_on_a_timer(quiet: Running) -> None:
    assert quiet.get()[0] == b"ok"
    time.sleep(0.3)  # the request's own tail (keep-alive close) settles
    before = _switches(quiet.tid)
    time.sleep(2.0)
    woke = _switches(quiet.tid) - before
    # uvicorn's own main_loop wakes 10 times a second: 20 here.
    assert woke <= 3, f"the idle server's loop woke {woke} times in 2 s"


def test_setting_should_exit_from_another_thread_stops_the_server_at_once(quiet: Running) -> None:
    t0 = time.monotonic()
    quiet.server.should_exit = True
    quiet.thread.join(5)
    assert not quiet.thread.is_alive()
    assert time.monotonic() - t0 < 1.0  # the wait ends on the event, not on a poll


def test_responses_carry_a_current_date_header_and_the_configured_headers(quiet: Running) -> None:
    body, headers = quiet.get()
    assert body == b"ok" and headers["x-node"] == "1" and headers["server"] == "uvicorn"
    assert abs(parsedate_to_datetime(headers["date"]).timestamp() - time.time()) < 2
    time.sleep(1.1)  # the next second: rendered again on the next response
    later = parsedate_to_datetime(quiet.get()[1]["date"])
    assert later > parsedate_to_datetime(headers["date"])


def test_lazy_headers_render_once_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    config = uvicorn.Config(_app, headers=[("x-node", "1")])
    config.load()
    state = LazyHeaders(config)
    now = [1_700_000_000.2]
    monkeypatch.setattr("node.uvserver.time.time", lambda: now[0])
    first = state.default_headers
    assert first[0] == (b"date", b"Tue, 14 Nov 2023 22:13:20 GMT") and (b"x-node", b"1") in first
    now[0] += 0.5
    assert state.default_headers is first  # the same second: not rendered again
    now[0] += 0.5
    assert state.default_headers[0] == (b"date", b"Tue, 14 Nov 2023 22:13:21 GMT")
    state.default_headers = []  # what uvicorn's on_tick / ServerState.__init__ do: ignored
    assert state.default_headers[0][0] == b"date"
    config.date_header = False
    assert state.default_headers == config.encoded_headers


def test_the_web_supervisor_replaces_a_killed_worker_at_once_and_otherwise_sleeps(
    data_dir: Path, tmp_path: Path, processes: Processes
) -> None:
    start_front(data_dir, tmp_path, processes)
    supervisor = processes.procs["web"].pid
    web = _python_child(supervisor)
    workers = set(_workers(web))
    assert len(workers) == 2

    def switches(pid: int) -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(status.split("voluntary_ctxt_switches:")[1].split()[0])

    before = switches(web)
    time.sleep(2.0)
    woke = switches(web) - before
    assert woke <= 4, f"the idle supervisor woke {woke} times in 2 s (uvicorn's pings: 4+ per worker)"
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    wait_until(
        lambda: len(set(_workers(web)) - {victim}) == 2, HEALTHCHECK_INTERVAL, 0.05, "a replacement worker"
    )
    assert time.monotonic() - t0 < HEALTHCHECK_INTERVAL / 2  # SIGCHLD, not the next health check


def _python_child(pid: int) -> int:
    """``sh -c ... exec python -m node.workers.web`` or the python itself."""
    if b"node.workers.web" in Path(f"/proc/{pid}/cmdline").read_bytes():
        return pid
    return next(
        c for c in iter_children(pid) if b"node.workers.web" in Path(f"/proc/{c}/cmdline").read_bytes()
    )


def _workers(pid: int) -> list[int]:
    out = []
    for child in iter_children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(child)
        except OSError:
            pass
    return out
