"""An idle whole node: CPU per process, and how fast it wakes (issue 16).

    python -m bench idle [--devices 10] [--idle 20] [--wakes 10] [--gap 2] [--compare TREE]

Starts a whole node (``honcho start`` of the Procfile, 2 web workers, private data
dir, free loopback ports), connects ``--devices`` device WebSockets that stay quiet
and one client app following every device, then

1. samples the CPU time of every node process over ``--idle`` seconds (honcho, the
   process manager, is reported apart: it is not part of the node);
2. sends one message right after that silence (``--idle`` + 3 s: longer than any
   back-off of the node's idle waits) and measures its wake-up latency: device ->
   ack, device -> client app (fanout), device -> row in the SQLite store
   (``first_wake_after_idle_ms``);
3. ``--wakes`` times, after ``--gap`` s of silence, the same (``wake_latency_ms``).

``--compare TREE`` runs the same measurement on another checkout right after (e.g.
``git worktree add /tmp/before <commit>``, built with ``python setup.py build_ext
--inplace``), so both are measured in one run on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from bench import procstat
from bench.runner import REPO
from bench.targets import NODE_PORTS, SECRET, node_env, start_honcho, stop_group
from node.auth import issue_client_token, issue_device_token


def _wait_port(port: int, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"bench idle: port {port} did not open within {timeout}s")


def _cpu(pids: list[int]) -> dict[int, tuple[str, float]]:
    out: dict[int, tuple[str, float]] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (procstat.role(pid), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return out


async def _measure(tree: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data = work / "data"
    data.mkdir(parents=True)
    env, ports = node_env(data, 2, NODE_PORTS)
    proc = start_honcho(tree, env, work / "node.log")
    try:
        _wait_port(ports["NODE_WEB_PORT"])
        _wait_port(ports["NODE_FANOUT_PORT"])
        url = f"ws://127.0.0.1:{ports['NODE_WEB_PORT']}/v1/ingest"
        devices = [
            await connect(f"{url}?token={issue_device_token(SECRET, f'idle-{i}')}", ping_interval=20)
            for i in range(args.devices)
        ]
        stream = f"ws://127.0.0.1:{ports['NODE_FANOUT_PORT']}/v1/stream?device=*"
        app = await connect(f"{stream}&token={issue_client_token(SECRET, ['*'])}")
        await asyncio.sleep(3.0)  # start-up work (GC freezes, first scrapes) settles
        pids = procstat.descendants([proc.pid])
        before = _cpu(pids)
        await asyncio.sleep(args.idle)
        after = _cpu(pids)
        per_role: dict[str, float] = {}
        for pid, (role, cpu) in after.items():
            if pid in before:
                per_role[role] = per_role.get(role, 0.0) + (cpu - before[pid][1]) / args.idle * 100
        manager = sum(v for k, v in per_role.items() if k.startswith("honcho"))
        node = sum(v for k, v in per_role.items() if not k.startswith("honcho"))
        store = data / "store.sqlite3"
        lat: dict[str, list[float]] = {"ack": [], "client app": [], "store": []}
        for k in range(args.wakes + 1):
            if k:  # message 0 goes right after the CPU sampling's silence
                await asyncio.sleep(args.gap)
            t0 = time.monotonic()
            await devices[0].send(json.dumps({"seq": k, "data": {"v": k}}))
            assert json.loads(await asyncio.wait_for(devices[0].recv(), 10))["ack"] == k
            lat["ack"].append(time.monotonic() - t0)
            while True:
                frame = json.loads(await asyncio.wait_for(app.recv(), 10))
                if frame["device"] == "idle-0" and frame["seq"] == k:
                    break
            lat["client app"].append(time.monotonic() - t0)
            for _ in range(10_000):  # bounded: 10 s at 1 ms
                with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
                    row = db.execute(
                        "SELECT 1 FROM messages WHERE device_id='idle-0' AND seq=?", (k,)
                    ).fetchone()
                if row:
                    break
                await asyncio.sleep(0.001)
            lat["store"].append(time.monotonic() - t0)
        for ws in (*devices, app):
            await ws.close()
        return {
            "tree": str(tree),
            "idle_cpu_pct_of_one_core": round(node, 2),
            "process_manager_cpu_pct": round(manager, 2),
            "per_process_pct": {k: round(v, 2) for k, v in sorted(per_role.items())},
            "first_wake_after_idle_ms": {k: round(v[0] * 1e3, 2) for k, v in lat.items()},
            "wake_latency_ms": {
                k: {"median": round(statistics.median(v[1:]) * 1e3, 2), "max": round(max(v[1:]) * 1e3, 2)}
                for k, v in lat.items()
            },
        }
    finally:
        stop_group(proc)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench idle", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--idle", type=float, default=20.0, help="seconds of CPU sampling (20)")
    p.add_argument("--wakes", type=int, default=10, help="messages after --gap s each (10; at least 1)")
    p.add_argument("--gap", type=float, default=2.0, help="seconds of silence before each wake (2)")
    p.add_argument("--compare", type=Path, help="another checkout to measure the same way, right after")
    args = p.parse_args()
    if args.wakes < 1:
        p.error(f"--wakes must be at least 1, got {args.wakes}")
    trees = [REPO] + ([args.compare.resolve()] if args.compare else [])
    results = []
    for tree in trees:
        with tempfile.TemporaryDirectory(prefix="iotnode-idle-", dir="/tmp") as tmp:
            results.append(asyncio.run(_measure(tree, args, Path(tmp))))
    command = "python -m bench idle " + " ".join(sys.argv[1:])
    print(json.dumps({"command": command, "results": results}, indent=2))
    if len(results) == 2 and results[1]["idle_cpu_pct_of_one_core"]:
        ratio = results[0]["idle_cpu_pct_of_one_core"] / results[1]["idle_cpu_pct_of_one_core"]
        print(f"idle CPU, this tree / {results[1]['tree']}: {ratio:.2f}")


if __name__ == "__main__":
    main()
