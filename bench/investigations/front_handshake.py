"""Server CPU time per handshake and per message: the front vs a bare Starlette app.

    python -m bench.investigations.front_handshake [CONNECTIONS] [ROUNDS]

Starts, side by side, (a) a baseline: a Starlette WebSocket endpoint that accepts
without auth and answers every frame with a fixed ack, under the same uvicorn
options as ``web``; (b) the front (one worker, ``python -m bench.investigations.front_variant
auto``).  For each, opens CONNECTIONS (default 3000) device connections, then sends
one message per connection and waits for its ack, reading the server's CPU time
(utime + stime from /proc) around each phase.  CPU time, unlike wall time, stays
meaningful on a machine shared with other jobs.  Loopback only; logs and the
front's data dir go to a temporary directory, removed at the end.  Results: docs/front.md.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import websockets

from bench.runner import REPO
from bench.targets import SECRET, free_port, wait_for_port
from node.auth import issue_device_token
from node.procmetrics import read_process

BASELINE = """
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

async def ingest(ws):
    await ws.accept()
    while True:
        m = await ws.receive()
        if m["type"] != "websocket.receive":
            return
        await ws.send({"type": "websocket.send", "bytes": b"\\x81\\xa3ack\\x01"})

app = Starlette(routes=[WebSocketRoute("/v1/ingest", ingest)])
uvicorn.run(app, host="127.0.0.1", port=int(__import__("sys").argv[1]), loop="uvloop", http="httptools",
            ws="websockets-sansio", ws_per_message_deflate=False, access_log=False, log_level="warning",
            backlog=4096)
"""


def cpu_seconds(pid: int) -> float:
    sample = read_process(pid)
    if sample is None:
        raise SystemExit(f"process {pid} is gone")
    return sample[0]


def front_env(data_dir: Path) -> dict[str, str]:
    """The one-worker front's environment: no inherited NODE_*, a private data dir, a free port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
    env.update(
        NODE_DATA_DIR=str(data_dir),
        NODE_HOST="127.0.0.1",
        NODE_WEB_PORT=str(free_port()),
        NODE_JWT_SECRET=SECRET,
        NODE_WEB_WORKERS="1",
        NODE_LOG_LEVEL="warning",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    return env


async def load(url: str, pid: int, n: int) -> tuple[float, float]:
    token = issue_device_token(SECRET, "measure")
    gate = asyncio.Semaphore(200)

    async def connect() -> websockets.ClientConnection:
        async with gate:
            return await websockets.connect(
                url,
                additional_headers={"Authorization": f"Bearer {token}"},
                open_timeout=120,
                ping_interval=None,
            )

    c0 = cpu_seconds(pid)
    conns = await asyncio.gather(*(connect() for _ in range(n)))
    c1 = cpu_seconds(pid)
    for ws in conns:
        await ws.send(b"\x82\xa3seq\x01\xa4data\x01")  # {"seq": 1, "data": 1}
    for ws in conns:
        await asyncio.wait_for(ws.recv(), 60)
    c2 = cpu_seconds(pid)
    await asyncio.gather(*(ws.close() for ws in conns))
    return (c1 - c0) / n, (c2 - c1) / n


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="handshake-") as tmp:
        run(Path(tmp), n, rounds)


def run(workdir: Path, n: int, rounds: int) -> None:
    base_port = free_port()
    (workdir / "data").mkdir()
    env = front_env(workdir / "data")
    logs = [workdir / "baseline.log", workdir / "front.log"]
    procs = []
    for argv, log, proc_env in (
        ([sys.executable, "-c", BASELINE, str(base_port)], logs[0], None),
        ([sys.executable, "-m", "bench.investigations.front_variant", "auto"], logs[1], env),
    ):
        with open(log, "ab") as fh:
            procs.append(
                subprocess.Popen(
                    argv,
                    env=proc_env,
                    cwd=str(REPO),
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    try:
        wait_for_port(base_port, procs[0], logs[0])
        wait_for_port(int(env["NODE_WEB_PORT"]), procs[1], logs[1])
        time.sleep(2)
        targets = [
            ("baseline", f"ws://127.0.0.1:{base_port}/v1/ingest", procs[0].pid),
            ("front", f"ws://127.0.0.1:{env['NODE_WEB_PORT']}/v1/ingest", procs[1].pid),
        ]
        for r in range(rounds):
            for name, url, pid in targets:
                hs, msg = asyncio.run(load(url, pid, n))
                print(
                    f"round {r + 1} {name:8s}: {hs * 1e3:.2f} ms CPU per handshake, "
                    f"{msg * 1e6:.0f} us CPU per message (one per connection, {n} connections)"
                )
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)


if __name__ == "__main__":
    main()
