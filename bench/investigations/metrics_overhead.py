"""What the metrics cost a whole node: the same node with ``NODE_METRICS=on`` and
``NODE_METRICS=off``, loaded in turn by the bench harness.

    python -m bench.investigations.metrics_overhead [--rounds 3] [-d 10] [-n 100] [-w 32] [--workers 2]

Starts two nodes at once (``honcho start`` of the Procfile, private data dirs,
free loopback ports, web workers ``--workers``), then for each round runs
``python -m bench max --url ...`` against each (the order alternates by round, so
a shared machine's drift hits both alike).  Prints, per round and as the median,
acked msg/s, p99 and the target's CPU per acked message, and the on/off ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.targets import NODE_PORTS, REPO, SECRET, node_env, start_honcho, stop_group, wait_for_port


def start_node(workdir: Path, metrics: str, workers: int) -> tuple[subprocess.Popen[bytes], str, Path]:
    data = workdir / f"data-{metrics}"
    data.mkdir(parents=True)
    env, ports = node_env(data, workers, NODE_PORTS, NODE_METRICS=metrics)
    log = workdir / f"node-{metrics}.log"
    proc = start_honcho(REPO, env, log)
    wait_for_port(ports["NODE_WEB_PORT"], proc, log, timeout=60)
    return proc, f"ws://127.0.0.1:{ports['NODE_WEB_PORT']}/v1/ingest", log


def load(url: str, pid: int, out: Path, args: argparse.Namespace) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.glob("*.json"))
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "max",
        "--url",
        url,
        "--secret",
        SECRET,
        "--pid",
        str(pid),
        "-n",
        str(args.connections),
        "-w",
        str(args.window),
        "-d",
        str(args.duration),
        "-q",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, cwd=str(REPO), check=True, stdout=subprocess.DEVNULL, timeout=args.duration + 120)
    (result,) = set(out.glob("*.json")) - before
    row = json.loads(result.read_text())["table"][0]
    acked = float(row["acked_msg_s"])
    cpu_us = float(row["target_cpu_pct"]) / 100 / acked * 1e6 if acked else float("nan")
    return {
        "acked_msg_s": acked,
        "p99_ms": float(row["p99_ms"]),
        "cpu_us_per_msg": cpu_us,
        "errors": float(row["errors"]),
        "unacked": float(row["unacked"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.investigations.metrics_overhead", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", "-d", type=float, default=10.0)
    p.add_argument("--connections", "-n", type=int, default=100)
    p.add_argument("--window", "-w", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    for name in ("rounds", "connections", "window", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.duration <= 600:
        p.error(f"--duration must be within 1..600 s, got {args.duration}")
    workdir = Path(tempfile.mkdtemp(prefix="iotnode-metrics-overhead-"))
    nodes: dict[str, tuple[subprocess.Popen[bytes], str, Path]] = {}
    try:
        for mode in ("on", "off"):
            nodes[mode] = start_node(workdir, mode, args.workers)
        time.sleep(2)
        rows: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
        for r in range(args.rounds):
            for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                proc, url, _ = nodes[mode]
                rows[mode].append(load(url, proc.pid, workdir / "results", args))
                print(
                    f"round {r + 1} metrics={mode}: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in rows[mode][-1].items()),
                    flush=True,
                )
        print(
            f"\nmedian of {args.rounds} rounds (bench max -n {args.connections} -w {args.window} -d "
            f"{args.duration},"
            f" {args.workers} web workers):"
        )
        for key in ("acked_msg_s", "p99_ms", "cpu_us_per_msg"):
            on, off = (statistics.median(x[key] for x in rows[m]) for m in ("on", "off"))
            ratios = [a[key] / b[key] for a, b in zip(rows["on"], rows["off"], strict=False) if b[key]]
            print(
                f"  {key:15s} on {on:10.1f}  off {off:10.1f}  on/off {on / off:.3f}"
                f"  (per round {', '.join(f'{x:.3f}' for x in ratios)})"
            )
        return 0
    finally:
        for proc, _, _ in nodes.values():
            stop_group(proc)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
