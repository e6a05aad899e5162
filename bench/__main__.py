"""``python -m bench SCENARIO [options]`` — see docs/bench.md.

Scenarios: c10k (many paced devices), max (closed-loop throughput), soak (long,
fixed rate, drift), compare (no-op, iotnode, redis, mosquitto in one run),
e2e (whole node: stored msg/s and device → fanout-client latency),
report (re-render a results JSON: HTML and PNG/SVG charts).

Component scenarios (each its own options, ``python -m bench NAME --help``): ring
(the ring against raw libpmem / msync), pipeline (monitor + router between real
ring files), publisher-store (publisher -> store batches), fanout-stream (the
fanout's per-client cost), multinode (3 front nodes -> 1 middle tier over network
namespaces, against a single node; root), idle (an idle node's CPU per process and
its wake-up latency).  One-off measurements are in ``bench/investigations``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import e2e, proto, report, runner, targets
from bench.loadgen import raise_nofile_limit

DEFAULTS: dict[str, dict[str, Any]] = {
    "c10k": {
        "mode": "rate",
        "connections": 10_000,
        "rate": 1.0,
        "window": 1000,
        "duration": 30.0,
        "ramp": 2000.0,
    },
    "max": {"mode": "max", "connections": 100, "rate": 1.0, "window": 32, "duration": 15.0, "ramp": 2000.0},
    "soak": {
        "mode": "rate",
        "connections": 1000,
        "rate": 10.0,
        "window": 1000,
        "duration": 600.0,
        "ramp": 1000.0,
    },
}


def _scenario_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument(
        "--connections", "-n", type=int, help="device connections (c10k 10000, max 100, soak 1000)"
    )
    g.add_argument(
        "--rate", "-r", type=float, help="messages per second per connection, open loop (c10k 1, soak 10)"
    )
    g.add_argument(
        "--window", "-w", type=int, help="messages in flight per connection (max: W=32; rate: cap 1000)"
    )
    g.add_argument("--duration", "-d", type=float, help="seconds of steady load (c10k 30, max 15, soak 600)")
    g.add_argument("--ramp", type=float, help="connections opened per second (2000)")
    g.add_argument("--payload", type=int, default=64, help="approximate message size in bytes (64)")
    g.add_argument("--encoding", choices=proto.ENCODINGS, default="msgpack")
    g.add_argument("--processes", "-p", type=int, default=2, help="load-generator processes (2)")
    g.add_argument(
        "--sources", type=int, default=8, help="127.0.0.x source addresses to spread connections over (8)"
    )
    g.add_argument(
        "--drain", type=float, default=5.0, help="seconds to wait for outstanding acks at the end (5)"
    )
    g.add_argument("--metrics-every", type=float, default=5.0, help="seconds between /metrics scrapes (5)")
    t = p.add_argument_group("system under test")
    t.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="web worker processes of a target the harness starts (default: CPUs, like NODE_WEB_WORKERS)",
    )
    t.add_argument(
        "--node-env",
        action="append",
        default=[],
        metavar="NODE_VAR=VALUE",
        help="a setting for the iotnode targets the harness starts (repeatable), e.g."
        " NODE_PIPELINE_COALESCE_MS=20",
    )
    t.add_argument("--out", type=Path, default=report.RESULTS, help="results directory (bench/results)")
    t.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    t.add_argument(
        "--keep", type=Path, help="keep targets' data and logs (and the generators' logs) in this directory"
    )


def _scenario(name: str, args: argparse.Namespace) -> runner.Scenario:
    d = dict(DEFAULTS[name])
    for key in ("connections", "rate", "window", "duration", "ramp"):
        if getattr(args, key) is not None:
            d[key] = getattr(args, key)
    scn = runner.Scenario(
        name=name,
        payload=args.payload,
        encoding=args.encoding,
        processes=args.processes,
        sources=args.sources,
        drain=args.drain,
        metrics_every=args.metrics_every,
        **d,
    )
    scn.check()
    return scn


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("c10k", "many devices at a paced rate (open loop)"),
        ("max", "closed-loop maximum throughput, W in flight per connection"),
        ("soak", "long run at a fixed rate; latency, RSS and ring-depth drift"),
    ):
        p = sub.add_parser(name, help=help_)
        _scenario_args(p)
        g = p.add_argument_group("target (one of --target or --url)")
        g.add_argument("--target", choices=targets.NAMES, help="start this system on loopback and load it")
        g.add_argument("--url", help="an already running device endpoint, e.g. ws://127.0.0.1:8000/v1/ingest")
        g.add_argument(
            "--kind", choices=("iotnode", "mqtt"), default="iotnode", help="protocol spoken to --url"
        )
        g.add_argument("--secret", help="HS256 key for device tokens (default: --data-dir/jwt_secret)")
        g.add_argument("--data-dir", type=Path, help="the node's NODE_DATA_DIR, to read jwt_secret from")
        g.add_argument(
            "--pid",
            type=int,
            action="append",
            default=[],
            help="sample CPU/RSS of this process tree (repeat)",
        )
        g.add_argument(
            "--metrics",
            action="append",
            default=[],
            help="a /metrics URL to scrape ring depths from (repeat)",
        )
    p = sub.add_parser("compare", help="no-op, iotnode, redis and mosquitto, same load, one table")
    p.add_argument("--scenario", choices=("c10k", "max"), default="c10k")
    p.add_argument("--targets", default=",".join(targets.NAMES), help="comma-separated subset, in order")
    p.add_argument("--rounds", type=int, default=3, help="each target is loaded once per round, in turn (3)")
    _scenario_args(p)
    e2e.add_parser(sub)
    for name, module in COMPONENTS.items():
        sub.add_parser(name, help=f"component benchmark ({module}; its own options: {name} --help)")
    p = sub.add_parser("report", help="re-render the HTML report and charts of a results JSON")
    p.add_argument("json", type=Path)
    return ap


#: Component scenarios: ``python -m bench NAME ...`` runs that module's own command line.
COMPONENTS: dict[str, str] = {
    "ring": "bench.ring_bench",
    "pipeline": "bench.monitor_router",
    "publisher-store": "bench.publisher_store",
    "fanout-stream": "bench.fanout_stream",
    "multinode": "bench.multinode",
    "idle": "bench.idle",
}


def _component(name: str, argv: list[str]) -> int:
    module = importlib.import_module(COMPONENTS[name])
    saved = sys.argv
    sys.argv = [f"python -m bench {name}", *argv]
    try:
        module.main()
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMPONENTS:
        return _component(argv[0], argv[1:])
    ap = build_parser()
    args = ap.parse_args(argv)
    command = "python -m bench " + shlex.join(argv)
    # Targets the harness starts (redis-server, mosquitto) inherit this process's limit.
    raise_nofile_limit(1 << 20)
    try:
        if args.command == "report":
            doc = json.loads(args.json.read_text())
            html_path, *chart_paths = report.render_files(doc, args.json)
            for path in [*chart_paths, html_path]:  # the HTML last
                print(path)
            return 0
        progress = None if args.quiet else sys.stderr
        if args.command == "compare":
            return _compare(args, command, progress)
        if args.command == "e2e":
            with _workdir(args.keep) as tmp:
                e2e.print_doc(e2e.run(args, Path(tmp), command, progress))
            return 0
        scn = _scenario(args.command, args)
        if bool(args.target) == bool(args.url):
            ap.error("give exactly one of --target NAME (started by the harness) or --url URL")
        with _workdir(args.keep) as tmp:
            if args.target:
                try:
                    extra = e2e.parse_node_env(args.node_env)
                    with targets.start(args.target, Path(tmp) / args.target, args.workers, extra) as target:
                        result = runner.run(scn, target, Path(tmp) / "logs", progress)
                except targets.Skip as exc:
                    print(f"skipped: {exc}", file=sys.stderr)
                    return 3
            else:
                secret = proto.read_secret(args.secret, args.data_dir) if args.kind == "iotnode" else None
                target = runner.Target(
                    "url", args.url, kind=args.kind, secret=secret, pids=args.pid, metrics=args.metrics
                )
                result = runner.run(scn, target, Path(tmp) / "logs", progress)
        paths = report.save([result], f"{scn.name}-{result['target']['name']}", args.out, command)
        print(report.format_table(report.table_rows([result])))
        for w in result["warnings"]:
            print(f"warning: {w}")
        print(f"results: {paths[0]}\nreport:  {paths[1]}")
        return 0
    except proto.BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _workdir(keep: Path | None) -> Any:
    """A private directory for targets and logs: temporary, or ``--keep DIR`` (kept)."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="iotnode-bench-") as tmp:
            yield tmp
    else:
        keep.mkdir(parents=True, exist_ok=True)
        yield str(keep)
        print(f"kept: {keep}", file=sys.stderr)


def _compare(args: argparse.Namespace, command: str, progress: Any) -> int:
    """Start every target at once, then run ``--rounds`` rounds, each target once per
    round in turn, so that slow drifts of a shared machine hit all of them alike.
    Each target is reported by its median round; ratios are taken within a round."""
    scn = _scenario(args.scenario, args)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    for n in names:
        if n not in targets.NAMES:
            raise proto.BenchError(
                f"--targets: unknown target {n!r}, expected some of {', '.join(targets.NAMES)}"
            )
    if args.rounds < 1:
        raise proto.BenchError(f"--rounds: expected an integer >= 1, got {args.rounds}")
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    skipped: dict[str, str] = {}
    with _workdir(args.keep) as tmp, contextlib.ExitStack() as stack:
        running: dict[str, runner.Target] = {}
        extra = e2e.parse_node_env(args.node_env)
        for name in names:
            try:
                running[name] = stack.enter_context(
                    targets.start(name, Path(tmp) / name, args.workers, extra)
                )
            except targets.Skip as exc:
                print(f"skipped: {exc}", file=sys.stderr)
                skipped[name] = str(exc)
            except proto.BenchError as exc:
                print(f"failed to start {name}: {exc}", file=sys.stderr)
                skipped[name] = f"failed to start: {str(exc)[:300]}"
        for k in range(args.rounds):
            for name, target in running.items():
                if name in skipped:
                    continue
                if progress:
                    print(f"--- round {k + 1}/{args.rounds}: {name}", file=progress)
                try:
                    rounds[name].append(runner.run(scn, target, Path(tmp) / "logs" / f"{name}-{k}", progress))
                except proto.BenchError as exc:
                    print(f"failed: {name}: {exc}", file=sys.stderr)
                    skipped[name] = f"failed: {str(exc)[:300]}"
    results = combine_rounds(names, rounds, skipped)
    paths = report.save(results, f"compare-{scn.name}", args.out, command)
    print(report.format_table(report.table_rows(results)))
    for r in results:
        for w in r.get("warnings", []):
            print(f"warning: {r['target']['name']}: {w}")
    print(f"results: {paths[0]}\nreport:  {paths[1]}")
    return 0


def combine_rounds(
    names: list[str], rounds: dict[str, list[dict[str, Any]]], skipped: dict[str, str]
) -> list[dict[str, Any]]:
    """One result per target (its median round by throughput) with every round's
    throughput and p99, and per-round ratios to the no-op baseline."""
    results: list[dict[str, Any]] = []
    base = rounds.get("noop", []) if "noop" not in skipped else []
    for name in names:
        if name in skipped or not rounds.get(name):
            results.append({"target": {"name": name}, "skipped": skipped.get(name, "no result")})
            continue
        rs = rounds[name]
        ordered = sorted(rs, key=lambda r: r["acked_msg_s"])
        chosen = dict(ordered[(len(ordered) - 1) // 2])
        chosen["rounds"] = [
            {"acked_msg_s": r["acked_msg_s"], "p99_ms": r["latency_ms"].get("p99")} for r in rs
        ]
        if base and len(base) == len(rs):
            chosen["thr_vs_noop_rounds"] = [
                round(r["acked_msg_s"] / b["acked_msg_s"], 3) if b["acked_msg_s"] else None
                for r, b in zip(rs, base, strict=True)
            ]
        results.append(chosen)
    return results


if __name__ == "__main__":
    sys.exit(main())
