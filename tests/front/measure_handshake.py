"""Server CPU time per handshake and per message: the front vs a bare Starlette app.

    python -m tests.front.measure_handshake [CONNECTIONS] [ROUNDS]

Starts, side by side, (a) a baseline: a Starlette WebSocket endpoint that accepts
without auth and answers every frame with a fixed ack, under the same uvicorn
options as ``web``; (b) the front (one worker, ``python -m tests.front.front_variant
auto``).  For each, opens CONNECTIONS (default 3000) device connections, then sends
one message per connection and waits for its ack, reading the server's CPU time
(utime + stime from /proc) around each phase.  CPU time, unlike wall time, stays
meaningful on a machine shared with other jobs.  Not collected by pytest.
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

from node.auth import issue_device_token
from tests.support import REPO, free_port, node_env, wait_for_port

SECRET = "test-secret-0123456789abcdef"

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
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, pid: int, n: int) -> tuple[float, float]:
    token = issue_device_token(SECRET, "measure")
    gate = asyncio.Semaphore(200)

    async def connect() -> websockets.ClientConnection:
        async with gate:
            return await websockets.connect(
                url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=120, ping_interval=None
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
    base_port = free_port()
    env = node_env(Path(tempfile.mkdtemp(prefix="handshake-")), NODE_WEB_WORKERS=1, NODE_LOG_LEVEL="warning")
    procs = [
        subprocess.Popen([sys.executable, "-c", BASELINE, str(base_port)], cwd=str(REPO), start_new_session=True),
        subprocess.Popen([sys.executable, "-m", "tests.front.front_variant", "auto"], env=env, cwd=str(REPO),
                         start_new_session=True),
    ]
    try:
        wait_for_port(base_port)
        wait_for_port(int(env["NODE_WEB_PORT"]))
        time.sleep(2)
        targets = [("baseline", f"ws://127.0.0.1:{base_port}/v1/ingest", procs[0].pid),
                   ("front", f"ws://127.0.0.1:{env['NODE_WEB_PORT']}/v1/ingest", procs[1].pid)]
        for r in range(rounds):
            for name, url, pid in targets:
                hs, msg = asyncio.run(load(url, pid, n))
                print(f"round {r + 1} {name:8s}: {hs * 1e3:.2f} ms CPU per handshake, "
                      f"{msg * 1e6:.0f} us CPU per message (one per connection, {n} connections)")
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)


if __name__ == "__main__":
    main()
