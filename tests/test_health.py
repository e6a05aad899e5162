"""/healthz and /readyz: the routing (node.health) and real stage processes' answers."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from node import health
from tests.support import Processes, node_env, start_web, wait_for_port, wait_until


@pytest.fixture
def checks() -> Iterator[None]:
    saved = dict(health._checks)
    health._checks.clear()
    try:
        yield
    finally:
        health._checks.clear()
        health._checks.update(saved)


def call(app: health.WsgiApp, path: str) -> tuple[str, bytes]:
    got: list[str] = []
    body = b"".join(app({"PATH_INFO": path}, lambda status, headers: got.append(status)))
    return got[0], body


def test_healthz_is_ok_readyz_runs_every_check_and_other_paths_go_to_the_app(checks: None) -> None:
    def metrics(environ: dict[str, object], start_response: object) -> list[bytes]:
        start_response("200 OK", [])  # type: ignore[operator]
        return [b"metrics"]

    app = health.wrap(metrics)
    assert call(app, "/healthz") == ("200 OK", b"ok\n")
    assert call(app, "/readyz") == ("503 Service Unavailable", b"starting\n")
    assert call(app, "/metrics") == ("200 OK", b"metrics")
    state = {"up": False}
    health.ready_when("ring", lambda: None)
    health.ready_when("router", lambda: None if state["up"] else "not connected")
    assert call(app, "/readyz") == ("503 Service Unavailable", b"router: not connected\n")
    state["up"] = True
    assert call(app, "/readyz") == ("200 OK", b"ready\n")
    health.ready_when("broken", lambda: 1 // 0)  # type: ignore[func-returns-value]
    assert call(app, "/readyz") == ("503 Service Unavailable", b"broken: check failed: ZeroDivisionError\n")


def probe(port: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_stages_are_live_at_once_and_ready_only_when_their_next_stage_is_reachable(
    data_dir: Path, tmp_path: Path, processes: Processes
) -> None:
    env = node_env(data_dir)
    ports = {n: env[f"NODE_METRICS_PORT_{n.upper()}"] for n in ("monitor", "store", "router", "publisher")}
    for name in ("monitor", "store"):
        processes.start(name, f"node.workers.{name}", env, tmp_path)
        wait_for_port(int(ports[name]))
    for name, waits_for in (("monitor", "router"), ("store", "publisher")):
        assert probe(ports[name], "/healthz") == (200, "ok\n")
        want = f"{waits_for}: not connected"
        wait_until(
            lambda n=name, w=want: probe(ports[n], "/readyz")[1].startswith(w), 10, what=f"{name} checks"
        )
        assert probe(ports[name], "/readyz")[0] == 503
    for name in ("router", "publisher"):
        processes.start(name, f"node.workers.{name}", env, tmp_path)
    for name in ports:
        wait_until(lambda n=name: probe(ports[n], "/readyz") == (200, "ready\n"), 20, what=f"{name} ready")
    assert "iotnode_ring_depth" in probe(ports["monitor"], "/metrics")[1]
    processes.kill("router")
    wait_until(
        lambda: probe(ports["monitor"], "/readyz")[0] == 503, 15, what="monitor not ready without router"
    )


def _probe(port: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_web_and_fanout_answer_healthz_and_readyz_on_their_own_ports(
    data_dir: Path, tmp_path: Path, processes: Processes
) -> None:
    """The Kubernetes probes of web and fanout: the web is ready once its workers hold the
    ingress ring; the fanout once it is connected to the publisher (503 before, naming it)."""
    env = node_env(data_dir)
    start_web(processes, env, tmp_path)
    web = env["NODE_WEB_PORT"]
    assert _probe(web, "/healthz") == (200, "ok\n")
    assert wait_until(lambda: _probe(web, "/readyz") == (200, "ready\n"), 10, what="web ready")
    processes.start("fanout", "node.workers.fanout", env, tmp_path)
    fanout = env["NODE_FANOUT_PORT"]
    wait_for_port(int(fanout))
    assert _probe(fanout, "/healthz") == (200, "ok\n")
    status, text = _probe(fanout, "/readyz")  # no publisher runs yet
    assert status == 503 and "not connected to the publisher" in text
    processes.start("publisher", "node.workers.publisher", env, tmp_path)
    wait_until(lambda: _probe(fanout, "/readyz") == (200, "ready\n"), 15, what="fanout ready")
