"""Finding 2 of issue 14: the stages' /metrics servers listen on NODE_METRICS_HOST
(default 127.0.0.1, not NODE_HOST), hold a bounded number of connections for a
bounded time, and scrapes cannot make any server render more often than its cache
allows."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from node.metrics import MAX_SCRAPERS, SCRAPE_TIMEOUT
from tests.security.conftest import raw_connect, read_until_closed, running, short_dir, status_of
from tests.support import Processes, node_env, wait_until


def _serves(host: str, port: int) -> bool:
    try:
        return httpx.get(f"http://{host}:{port}/metrics", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return False
    except OSError:
        return True


@pytest.fixture
def router() -> Iterator[tuple[Processes, dict[str, str]]]:
    processes = Processes()
    data_dir = short_dir("sec-router-")
    try:
        yield processes, node_env(data_dir)
    finally:
        processes.stop_all()
        shutil.rmtree(data_dir, ignore_errors=True)


def _start_router(processes: Processes, env: dict[str, str]) -> int:
    processes.start("router", "node.workers.router", env, Path(env["NODE_DATA_DIR"]))
    return int(env["NODE_METRICS_PORT_ROUTER"])


def test_stage_metrics_listen_on_loopback_not_on_node_host(router: tuple[Processes, dict[str, str]]) -> None:
    processes, env = router
    env["NODE_HOST"] = "127.0.0.2"  # where web and fanout would listen
    port = _start_router(processes, env)
    wait_until(lambda: _serves("127.0.0.1", port), 20, what="router /metrics on 127.0.0.1")
    assert _refused("127.0.0.2", port)


def test_node_metrics_host_moves_them(router: tuple[Processes, dict[str, str]]) -> None:
    processes, env = router
    env["NODE_METRICS_HOST"] = "127.0.0.3"
    port = _start_router(processes, env)
    wait_until(lambda: _serves("127.0.0.3", port), 20, what="router /metrics on 127.0.0.3")
    assert _refused("127.0.0.1", port)


def test_idle_scrape_connections_are_bounded_and_time_out(router: tuple[Processes, dict[str, str]]) -> None:
    processes, env = router
    port = _start_router(processes, env)
    wait_until(lambda: _serves("127.0.0.1", port), 20, what="router /metrics")
    idle = [raw_connect(port) for _ in range(MAX_SCRAPERS + 6)]  # each sends half a request line
    try:
        for sock in idle:
            sock.sendall(b"GET /met")
        time.sleep(0.5)
        # Past the handler limit, connections are answered 503 at once (no thread each).
        busy = [status_of(read_until_closed(s, 3)[0]) for s in idle[MAX_SCRAPERS:]]
        assert busy == [503] * 6
        # The ones holding a handler are closed by the socket timeout, not kept forever.
        for sock in idle[:MAX_SCRAPERS]:
            _, took = read_until_closed(sock, 2 * SCRAPE_TIMEOUT + 5)
        assert _serves("127.0.0.1", port)
    finally:
        for sock in idle:
            sock.close()


def test_a_scrape_storm_on_the_web_port_renders_the_merged_output_at_most_once_a_second() -> None:
    with running("web") as web:
        url = f"http://127.0.0.1:{web.port}/metrics"
        with httpx.Client(timeout=10) as client:
            bodies = set()
            start = time.monotonic()
            for _ in range(200):
                bodies.add(client.get(url).text)
                if time.monotonic() - start > 0.8:
                    break
            took = time.monotonic() - start
        # process CPU seconds change between renders: identical texts mean one render
        assert len(bodies) <= 1 + int(took), f"{len(bodies)} renders in {took:.2f} s"
