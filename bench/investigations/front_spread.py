"""How does uvicorn spread a burst of connections over its worker processes?

    python -m bench.investigations.front_spread [CONNECTIONS] [ROUNDS]

Starts ``python -m node.workers.web`` with NODE_WEB_WORKERS=2 on a free loopback
port (the harness's ``front-msync`` target, :func:`bench.targets.start`), opens
CONNECTIONS device WebSockets at once (default 2000), counts the
sockets each worker holds (/proc/PID/fd, minus its idle count) and the workers'
RSS growth per connection (over the idle RSS; later rounds reuse freed memory),
closes them, and repeats ROUNDS times (default 3).  Results: docs/front.md.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import websockets

from bench import procstat, targets
from node.auth import issue_device_token


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
    """uvicorn's spawned workers below ``parent`` (not multiprocessing's resource tracker)."""
    return [p for p in procstat.descendants([parent]) if "spawn_main" in procstat.cmdline(p)]


async def burst(
    url: str, secret: str, n: int, pids: list[int], idle: dict[int, int]
) -> tuple[dict[int, int], int]:
    token = issue_device_token(secret, "spread")
    conns = await asyncio.gather(
        *(
            websockets.connect(
                url,
                additional_headers={"Authorization": f"Bearer {token}"},
                open_timeout=60,
                ping_interval=None,
            )
            for _ in range(n)
        )
    )
    await asyncio.sleep(0.5)
    counts = {pid: sockets(pid) - idle[pid] for pid in pids}
    memory = sum(rss(pid) for pid in pids)
    await asyncio.gather(*(c.close() for c in conns))
    return counts, memory


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with (
        tempfile.TemporaryDirectory(prefix="spread-") as workdir,
        targets.start("front-msync", Path(workdir), workers=2) as target,
    ):
        time.sleep(2)
        pids = workers(target.pids[0])
        if len(pids) != 2:
            raise SystemExit(f"expected 2 uvicorn workers below {target.pids[0]}, found {pids}")
        idle = {pid: sockets(pid) for pid in pids}
        idle_rss = sum(rss(pid) for pid in pids)
        assert target.secret is not None
        for r in range(rounds):
            counts, memory = asyncio.run(burst(target.url, target.secret, n, pids, idle))
            shares = ", ".join(f"{c} ({100 * c / n:.0f}%)" for c in counts.values())
            per_conn = (memory - idle_rss) / n / 1024
            print(
                f"round {r + 1}: {n} connections -> workers: {shares}; RSS of workers +{per_conn:.1f} "
                f"KiB/connection"
            )
            time.sleep(1)


if __name__ == "__main__":
    main()
