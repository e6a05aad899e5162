"""CPU cost of observing the device ack latency, in prometheus_client's multiprocess
mode (what the web workers run): ``Histogram.observe`` per message vs the web
front's way (node.front.metrics: local buckets per group, one flush per second).

    python -m bench.investigations.metrics_cost [--groups 2000] [--group-size 32] [--rounds 5]

Each round times both ways over the same latencies (and a bare loop over them as
the baseline) in this process; it prints the median ns per message of each and
the ratio.  Runs in a private PROMETHEUS_MULTIPROC_DIR (set before prometheus_client
is imported), removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.investigations.metrics_cost", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--groups", type=int, default=2000)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    for name in ("groups", "group_size", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if "prometheus_client" in sys.modules:
        p.error("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR could be set")
    path = tempfile.mkdtemp(prefix="iotnode-metrics-cost-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    try:
        return _run(args)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _run(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry, Histogram, values

    from node.front.committer import FrontStats
    from node.front.metrics import FrontMetrics
    from node.metrics import LATENCY_BUCKETS

    assert values.ValueClass.__name__ != "MutexValue", "not in multiprocess mode"
    rng = random.Random(1)
    now = 1000.0
    groups = [[now - rng.lognormvariate(-7, 1.5) for _ in range(args.group_size)] for _ in range(args.groups)]
    n = args.groups * args.group_size
    per_message_h = Histogram(
        "cost_per_message_seconds", "x", buckets=LATENCY_BUCKETS, registry=CollectorRegistry()
    )
    batched_h = Histogram("cost_batched_seconds", "x", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    metrics = FrontMetrics(FrontStats())

    def baseline() -> None:
        for group in groups:
            for t in group:
                now - t

    def per_message() -> None:
        observe = per_message_h.observe
        for group in groups:
            for t in group:
                observe(now - t)

    def batched() -> None:
        flush_every = max(1, args.groups // 10)  # ~10 flushes per run (the node: one a second)
        for i, group in enumerate(groups):
            metrics.on_group(now, group, 0)
            if i % flush_every == 0:
                metrics.latency.flush(batched_h)
        metrics.latency.flush(batched_h)

    results: dict[str, list[float]] = {"baseline": [], "per_message": [], "batched": []}
    for _ in range(args.rounds):
        for name, fn in (("baseline", baseline), ("per_message", per_message), ("batched", batched)):
            t0 = time.process_time()
            fn()
            results[name].append((time.process_time() - t0) / n * 1e9)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"{n} latencies per round in groups of {args.group_size}, {args.rounds} rounds, CPU ns per message "
        f"(median):"
    )
    for k, v in med.items():
        print(f"  {k:12s} {v:8.1f}   rounds: {', '.join(f'{x:.0f}' for x in results[k])}")
    cost_pm, cost_b = med["per_message"] - med["baseline"], med["batched"] - med["baseline"]
    print(
        f"  observe() per message costs {cost_pm:.0f} ns above the bare loop, local buckets {cost_b:.0f} ns:"
        f" {cost_pm / max(cost_b, 1e-9):.1f}x less"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
