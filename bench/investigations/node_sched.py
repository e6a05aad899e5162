"""The scheduler's view of a whole node under C10K load: CPU and run-queue wait per process.

    python -m bench.investigations.node_sched [--tree DIR] [-d 25] [--nice N] [--data-parent DIR]
                                              [NODE_VAR=VALUE ...]

Starts a node (``honcho start`` of ``--tree``'s Procfile, 2 web workers, data in a fresh
directory under ``--data-parent``, on disk by default), loads it with ``python -m bench
c10k --url`` (10,000 devices × 1 msg/s unless told otherwise through the bench's
defaults), and over the steady part of the run reads, for every node process, the sum
over its threads of ``/proc/PID/task/TID/schedstat``: CPU time, time spent **runnable
but waiting for a core** (run-queue wait) and time slices.  A web worker that waits
500 ms per second in the run queue acks late whatever its own code does: the number
tells CPU starvation apart from slow persists.  It also prints the web's
``iotnode_ack_latency_seconds`` and ``iotnode_persist_duration_seconds`` over the same
window (cumulative fractions per bucket) and the machine's other load (``/proc/stat``
busy time not spent by the node or the generator).

``--nice N`` renices every thread of the pipeline stages (monitor, router, publisher,
store, fanout) to N once the node is up -- the "web workers ahead of storage" lever
of issue 16.  Findings: docs/bench.md ("Where the whole node's ack tail goes").
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.targets import NODE_PORTS, SECRET, node_env, start_honcho, stop_group, wait_for_port

REPO = Path(__file__).resolve().parents[2]
HISTOGRAMS = ("iotnode_ack_latency_seconds", "iotnode_persist_duration_seconds")


def node_processes(data: Path) -> dict[str, int]:
    """``role[pid]`` → pid of the node's Python processes (not honcho, the shells, the
    web supervisor or its resource tracker), found by their ``NODE_DATA_DIR``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if f"NODE_DATA_DIR={data}\0".encode() not in Path(f"/proc/{entry}/environ").read_bytes():
                continue
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        cmd = b" ".join(argv).decode(errors="replace")
        if "python" not in argv[0].decode(errors="replace") or "honcho" in cmd or "resource_tracker" in cmd:
            continue
        role = "web worker" if "spawn_main" in cmd else cmd.split()[-1].rsplit(".", 1)[-1]
        if role != "web":  # the supervisor
            found[f"{role}[{entry}]"] = int(entry)
    return found


def schedstat(pid: int) -> tuple[int, int, int]:
    """(CPU ns, run-queue wait ns, time slices) summed over the process's threads."""
    cpu = wait = slices = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            a, b, c = map(int, Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split())
            cpu, wait, slices = cpu + a, wait + b, slices + c
    except (OSError, ValueError):
        pass
    return cpu, wait, slices


def busy_ns() -> int:
    """The machine's busy CPU time (every core), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) * (10**9 // os.sysconf("SC_CLK_TCK"))


def histograms(url: str) -> dict[str, dict[str, float]]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = re.match(r'(\w+)_bucket\{.*le="([^"]+)".*\} (\S+)', line)
        if m and m[1] in HISTOGRAMS:
            out.setdefault(m[1], {})[m[2]] = float(m[3])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, default=REPO, help="checkout whose node runs (default: this one)")
    ap.add_argument("-d", "--duration", type=int, default=25, help="seconds of steady load (25)")
    ap.add_argument("--nice", type=int, default=0, help="renice the pipeline stages' threads to this")
    ap.add_argument("--data-parent", default="/var/tmp", help="where the node's data directory is made")
    ap.add_argument("--out", default="bench/results", help="the c10k run's results directory")
    ap.add_argument("env", nargs="*", help="NODE_VAR=VALUE settings for the node")
    args = ap.parse_args()
    extra = dict(a.split("=", 1) for a in args.env)
    with tempfile.TemporaryDirectory(dir=args.data_parent, prefix="iotnode-sched-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        env, ports = node_env(data, 2, NODE_PORTS, **extra)
        log = Path(tmp) / "honcho.log"
        node = start_honcho(args.tree.resolve(), env, log)
        try:
            wait_for_port(ports["NODE_WEB_PORT"], node, log, timeout=60)
            time.sleep(2)
            procs = node_processes(data)
            if args.nice:
                for name, pid in procs.items():
                    if not name.startswith("web worker"):
                        for tid in os.listdir(f"/proc/{pid}/task"):
                            os.setpriority(os.PRIO_PROCESS, int(tid), args.nice)
            metrics = f"http://127.0.0.1:{ports['NODE_WEB_PORT']}/metrics"
            url = f"ws://127.0.0.1:{ports['NODE_WEB_PORT']}/v1/ingest"
            cmd = [sys.executable, "-m", "bench", "c10k", "--url", url, "--secret", SECRET]
            gen = subprocess.Popen([*cmd, "-d", str(args.duration), "-q", "--out", args.out], cwd=REPO)
            time.sleep(12)  # connections opened (2000/s) and the first steady seconds
            gen_pids = [int(p) for p in subprocess.run(
                ["pgrep", "-f", "bench.loadgen"], capture_output=True, text=True).stdout.split()]  # fmt: skip
            before = {n: schedstat(p) for n, p in procs.items()}
            gen_before = sum(schedstat(p)[0] for p in gen_pids)
            busy_before, hist_before, t0 = busy_ns(), histograms(metrics), time.monotonic()
            time.sleep(max(1, args.duration - 6))
            after = {n: schedstat(p) for n, p in procs.items()}
            gen_after = sum(schedstat(p)[0] for p in gen_pids)
            busy_after, hist_after, elapsed = busy_ns(), histograms(metrics), time.monotonic() - t0
            gen.wait()
        finally:
            stop_group(node)
    print(f"\n{'process':22s} {'CPU %':>6s} {'run-queue wait ms/s':>20s} {'wait per slice µs':>18s}")
    node_cpu = 0
    for name in sorted(procs):
        cpu, wait, slices = (a - b for a, b in zip(after[name], before[name], strict=True))
        node_cpu += cpu
        per_slice = wait / 1e3 / max(1, slices)
        print(f"{name:22s} {cpu / elapsed / 1e7:6.1f} {wait / elapsed / 1e6:20.1f} {per_slice:18.1f}")
    gen_cpu = gen_after - gen_before
    other = busy_after - busy_before - node_cpu - gen_cpu
    print(
        f"node {node_cpu / elapsed / 1e7:.0f} %, generator {gen_cpu / elapsed / 1e7:.0f} %,"
        f" everything else on the machine {max(0, other) / elapsed / 1e7:.0f} % (of one core)"
    )
    # the messages acked in the window: the ack histogram's count (every message gets one sample)
    acks = hist_after.get(HISTOGRAMS[0], {}).get("+Inf", 0.0)
    acks -= hist_before.get(HISTOGRAMS[0], {}).get("+Inf", 0.0)
    web_cpu = sum(after[n][0] - before[n][0] for n in procs if n.startswith("web worker"))
    if acks:
        per = web_cpu / 1e3 / acks
        print(f"web workers: {per:.1f} µs of CPU per acked message ({acks / elapsed:.0f} msg/s acked)")
    for name in HISTOGRAMS:
        delta = {le: v - hist_before.get(name, {}).get(le, 0.0) for le, v in hist_after.get(name, {}).items()}
        total = delta.pop("+Inf", 0.0)
        if total:
            cum = " ".join(
                f"≤{float(le) * 1e3:g}ms:{v / total:.2f}" for le, v in delta.items() if float(le) <= 0.5
            )
            print(f"{name} ({int(total)}): {cum}")


if __name__ == "__main__":
    main()
