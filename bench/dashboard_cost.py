"""What open dashboards cost a node: the same node at a fixed, modest load, with and
without K simulated dashboard pages.

    python -m bench.dashboard_cost [--pages 4] [--page stream,health|stream|health] [--rounds 2]
                                   [-d 8] [-n 200] [-r 5] [--workers 2]

Starts one node (``honcho start`` of the Procfile, private data dir, free loopback
ports), then runs ``--rounds`` pairs of ``python -m bench c10k --url ... -n N -r R``
(open loop: N devices x R msg/s), one without pages and one with K pages (the order
alternates by round, so a shared machine's drift hits both alike). A page does what
the dashboard's script does: ``GET /v1/devices`` once, the stream
``/v1/stream?device=*`` (every record), ``GET /v1/health`` every second. The pages
run in their own process, so their CPU is not the node's. Prints, per round and as
the median, acked msg/s, p99, the node's CPU per acked message (all its processes)
and the fanout's and web's CPU, and the with/without ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.targets import NODE_PORTS, REPO, SECRET, node_env, start_honcho, stop_group, wait_for_port

PORT_VARS = NODE_PORTS


def start_node(workdir: Path, workers: int) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    data = workdir / "data"
    data.mkdir(parents=True)
    env, ports = node_env(data, workers, PORT_VARS)
    log = workdir / "node.log"
    proc = start_honcho(REPO, env, log)
    for var in PORT_VARS:
        wait_for_port(ports[var], proc, log, timeout=60)
    return proc, ports


def load(ports: dict[str, int], pid: int, out: Path, args: argparse.Namespace) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.glob("*.json"))
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "c10k",
        "--url",
        f"ws://127.0.0.1:{ports['NODE_WEB_PORT']}/v1/ingest",
        "--secret",
        SECRET,
        "--pid",
        str(pid),
        "-n",
        str(args.connections),
        "-r",
        str(args.rate),
        "-d",
        str(args.duration),
        "--ramp",
        "1000",
        "-q",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, cwd=str(REPO), check=True, stdout=subprocess.DEVNULL, timeout=args.duration + 120)
    (path,) = set(out.glob("*.json")) - before
    doc = json.loads(path.read_text())
    row, result = doc["table"][0], doc["results"][0]
    acked = float(row["acked_msg_s"])
    by_role = result["target_procs"].get("cpu_s_by_role") or {}
    duration = float(result["scenario"]["duration"])

    def role_pct(word: str) -> float:
        return 100 * sum(v for k, v in by_role.items() if word in k) / duration

    return {
        "acked_msg_s": acked,
        "p99_ms": float(row["p99_ms"]),
        "node_cpu_us_per_msg": float(row["target_cpu_pct"]) / 100 / acked * 1e6 if acked else float("nan"),
        "node_cpu_pct": float(row["target_cpu_pct"]),
        "fanout_cpu_pct": role_pct("fanout"),
        "web_cpu_pct": role_pct("web"),
        "errors": float(row["errors"]),
    }


# ----------------------------------------------------------------- simulated pages
async def _get(port: int, path: str, token: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
    return int(data.split(b" ", 2)[1])


async def _poll(port: int, token: str, until: float, counts: dict[str, int]) -> None:
    while time.monotonic() < until:
        started = time.monotonic()
        status = await _get(port, "/v1/health", token)
        counts["health" if status == 200 else "health_errors"] += 1
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


async def _page(port: int, token: str, until: float, counts: dict[str, int], parts: str) -> None:
    import websockets

    assert await _get(port, "/v1/devices", token) == 200
    if "stream" not in parts:
        await _poll(port, token, until, counts)
        return
    url = f"ws://127.0.0.1:{port}/v1/stream?device=*&token={token}"
    async with websockets.connect(url, compression=None, max_size=None) as ws:

        async def read() -> None:
            async for _ in ws:
                counts["frames"] += 1

        reader = asyncio.ensure_future(read())
        try:
            if "health" in parts:
                await _poll(port, token, until, counts)
            else:
                await asyncio.sleep(max(0.0, until - time.monotonic()))
        finally:
            reader.cancel()


def pages_main(port: int, token: str, pages: int, seconds: float, parts: str) -> None:
    counts = {"frames": 0, "health": 0, "health_errors": 0}
    until = time.monotonic() + seconds

    async def run() -> None:
        await asyncio.gather(*(_page(port, token, until, counts, parts) for _ in range(pages)))

    asyncio.run(run())
    print(json.dumps(counts), flush=True)


def start_pages(ports: dict[str, int], args: argparse.Namespace, seconds: float) -> subprocess.Popen[str]:
    from node.auth import issue_client_token

    token = issue_client_token(SECRET, ["*"], ttl=3600)
    cmd = [sys.executable, "-m", "bench.dashboard_cost", "--_pages", str(ports["NODE_FANOUT_PORT"]), token]
    cmd += [str(args.pages), str(seconds), args.page]
    return subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.PIPE, text=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_pages"]:  # the pages' own process
        pages_main(int(argv[1]), argv[2], int(argv[3]), float(argv[4]), argv[5])
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.dashboard_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--pages", "-k", type=int, default=4, help="dashboard pages open in the loaded runs (4)")
    p.add_argument(
        "--page",
        choices=("stream,health", "stream", "health"),
        default="stream,health",
        help="what a page does: the stream device=*, /v1/health every second, or both (default)",
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", "-d", type=float, default=8.0)
    p.add_argument("--connections", "-n", type=int, default=200)
    p.add_argument("--rate", "-r", type=float, default=5.0, help="msg/s per device (5)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    for name in ("pages", "rounds", "connections", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.duration <= 600:
        p.error(f"--duration must be within 1..600 s, got {args.duration}")
    workdir = Path(tempfile.mkdtemp(prefix="iotnode-dashboard-cost-"))
    proc = None
    try:
        proc, ports = start_node(workdir, args.workers)
        time.sleep(2)
        rows: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
        for r in range(args.rounds):
            for mode in ("without", "with") if r % 2 == 0 else ("with", "without"):
                pages = None
                if mode == "with":  # open before the load starts, close after it ends
                    pages = start_pages(ports, args, args.duration + 8)
                    time.sleep(1)
                row = load(ports, proc.pid, workdir / "results", args)
                if pages is not None:
                    out, _ = pages.communicate(timeout=60)
                    row.update(
                        {f"pages_{k}": float(v) for k, v in json.loads(out.strip().splitlines()[-1]).items()}
                    )
                rows[mode].append(row)
                print(
                    f"round {r + 1} {mode} pages: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()),
                    flush=True,
                )
        print(
            f"\nmedian of {args.rounds} rounds (bench c10k -n {args.connections} -r {args.rate}"
            f" -d {args.duration}, {args.workers} web workers; 'with' = {args.pages} pages doing"
            f" {args.page}: stream = device=*, health = GET /v1/health every second):"
        )
        for key in (
            "acked_msg_s",
            "p99_ms",
            "node_cpu_us_per_msg",
            "node_cpu_pct",
            "fanout_cpu_pct",
            "web_cpu_pct",
        ):
            a, b = (statistics.median(x[key] for x in rows[m]) for m in ("with", "without"))
            ratios = [x[key] / y[key] for x, y in zip(rows["with"], rows["without"], strict=False) if y[key]]
            print(
                f"  {key:20s} with {a:10.2f}  without {b:10.2f}"
                f"  with/without {a / b if b else float('nan'):.3f}"
                f"  (per round {', '.join(f'{x:.3f}' for x in ratios)})"
            )
        return 0
    finally:
        if proc is not None:
            stop_group(proc)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
