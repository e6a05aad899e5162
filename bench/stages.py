"""Node stages as plain child processes, for the pipeline micro-benchmarks.

``monitor_router``, ``publisher_store`` and ``curve_link`` run one or two
``node.workers.*`` stages against ring files they fill or drain themselves (no
honcho, no web front).  This module is how they start and stop them:

    env = stage_env(data_dir, "process", ring_bytes, "monitor", "router")
    procs = [start("router", env, log), start("monitor", env, log)]
    ...
    stop(procs)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.runner import REPO, end_child
from bench.targets import free_port

__all__ = ["start", "stage_env", "stop"]


def stage_env(data_dir: Path, durability: str, ring_bytes: int, *stages: str) -> dict[str, str]:
    """The environment for ``stages``: this process's minus every ``NODE_*``, both
    rings of ``ring_bytes``, a free metrics port per stage, warnings only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
    env.update(
        NODE_DATA_DIR=str(data_dir),
        NODE_INGRESS_RING_BYTES=str(ring_bytes),
        NODE_FANIN_RING_BYTES=str(ring_bytes),
        NODE_DURABILITY=durability,
        NODE_LOG_LEVEL="warning",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.update({f"NODE_METRICS_PORT_{stage.upper()}": str(free_port()) for stage in stages})
    return env


def start(stage: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m node.workers.<stage>`` in its own session, output appended to ``log``."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", f"node.workers.{stage}"], env=env, cwd=str(REPO), stdout=fh,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every one first (they shut down side by side), then wait for each."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        end_child(p)
