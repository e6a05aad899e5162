"""How does uvicorn spread a burst of connections over its worker processes?

    python -m tests.front.measure_spread [CONNECTIONS] [ROUNDS]

Starts ``python -m node.workers.web`` with NODE_WEB_WORKERS=2 on a free loopback
port, opens CONNECTIONS device WebSockets at once (default 2000), counts the
sockets each worker holds (/proc/PID/fd, minus its idle count) and the workers'
RSS growth per connection (over the idle RSS; later rounds reuse freed memory),
closes them, and repeats ROUNDS times (default 3).  Not collected by pytest.
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
from tests.support import REPO, iter_children, node_env, wait_for_port

SECRET = "test-secret-0123456789abcdef"


def sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def workers(parent: int) -> list[int]:
    return [p for p in iter_children(parent) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


async def burst(url: str, n: int, pids: list[int], idle: dict[int, int]) -> tuple[dict[int, int], int]:
    token = issue_device_token(SECRET, "spread")
    conns = await asyncio.gather(
        *(websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=60,
                             ping_interval=None) for _ in range(n))
    )
    await asyncio.sleep(0.5)
    counts = {pid: sockets(pid) - idle[pid] for pid in pids}
    memory = sum(rss(pid) for pid in pids)
    await asyncio.gather(*(c.close() for c in conns))
    return counts, memory


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    data = Path(tempfile.mkdtemp(prefix="spread-"))
    env = node_env(data, NODE_WEB_WORKERS=2, NODE_LOG_LEVEL="warning")
    proc = subprocess.Popen([sys.executable, "-m", "node.workers.web"], env=env, cwd=str(REPO),
                            start_new_session=True)
    try:
        wait_for_port(int(env["NODE_WEB_PORT"]))
        time.sleep(2)
        pids = workers(proc.pid)
        idle = {pid: sockets(pid) for pid in pids}
        idle_rss = sum(rss(pid) for pid in pids)
        url = f"ws://127.0.0.1:{env['NODE_WEB_PORT']}/v1/ingest"
        for r in range(rounds):
            counts, memory = asyncio.run(burst(url, n, pids, idle))
            shares = ", ".join(f"{c} ({100 * c / n:.0f}%)" for c in counts.values())
            per_conn = (memory - idle_rss) / n / 1024
            print(f"round {r + 1}: {n} connections -> workers: {shares}; RSS of workers +{per_conn:.1f} KiB/connection")
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


if __name__ == "__main__":
    main()
