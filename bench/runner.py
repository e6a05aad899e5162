"""Runs one scenario against one target: spreads the device connections over
several generator processes (:mod:`bench.loadgen`), starts them together, shows
progress, samples the target's processes, and merges everything into one result.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from bench import procstat, proto
from bench.hist import Histogram

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Scenario:
    name: str = "c10k"  # c10k | max | soak
    mode: str = "rate"  # rate (open loop) | max (closed loop)
    connections: int = 10_000
    rate: float = 1.0  # messages per second per connection (open loop)
    window: int = 1000  # messages in flight per connection (max: W; rate: cap)
    duration: float = 30.0
    ramp: float = 2000.0  # connections opened per second, all processes together
    payload: int = 64
    encoding: str = "msgpack"
    processes: int = 2
    sources: int = 8  # 127.0.0.x source addresses the connections are spread over
    drain: float = 5.0
    metrics_every: float = 5.0
    distinct_ts: bool = False  # device ts in strictly increasing whole ms per connection (loadgen)

    def check(self) -> None:
        def bad(what: str, value: object, expected: str) -> None:
            raise proto.BenchError(f"{what}: expected {expected}, got {value!r}")

        if self.mode not in ("rate", "max"):
            bad("mode", self.mode, "rate or max")
        if self.connections < 1:
            bad("--connections", self.connections, "an integer >= 1")
        if self.mode == "rate" and not self.rate > 0:
            bad("--rate", self.rate, "a number > 0 (messages per second per connection)")
        if self.window < 1:
            bad("--window", self.window, "an integer >= 1")
        if not 0 < self.duration <= 7 * 86400:
            bad("--duration", self.duration, "seconds within (0, 604800]")
        if not self.ramp > 0:
            bad("--ramp", self.ramp, "connections per second > 0")
        if self.encoding not in proto.ENCODINGS:
            bad("--encoding", self.encoding, " or ".join(proto.ENCODINGS))
        if not 1 <= self.processes <= 64:
            bad("--processes", self.processes, "an integer within 1..64")
        if not 1 <= self.sources <= 250:
            bad("--sources", self.sources, "an integer within 1..250")
        if self.payload < 0 or self.payload > 1 << 20:
            bad("--payload", self.payload, "bytes within 0..1048576")


@dataclass
class Target:
    name: str
    url: str
    kind: str = "iotnode"  # iotnode (device protocol v1) | mqtt
    secret: str | None = None
    pids: list[int] = field(default_factory=list)  # roots of the processes to sample
    metrics: list[str] = field(default_factory=list)  # /metrics URLs to scrape ring depths from
    note: str = ""
    fanout_url: str = ""  # iotnode started by the harness: its client-app stream (bench.e2e)
    sink_metrics: list[str] = field(default_factory=list)  # /metrics of its storage sinks (iotnode+sinks)
    stores: dict[str, str] = field(default_factory=dict)  # where it stores: sqlite, postgres, victoria, lake

    def check(self) -> None:
        host = self.url.split("//", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        if not (host.startswith("127.") or host in ("localhost", "[::1]")):
            raise proto.BenchError(f"target URL must be on loopback (127.x.x.x), got {self.url!r}")
        if not self.url.startswith("ws://"):
            raise proto.BenchError(f"target URL must start with ws://, got {self.url!r}")


def end_child(proc: subprocess.Popen[Any], grace: float = 0.0) -> None:
    """Let ``proc`` exit by itself for ``grace`` s, then SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    if grace:
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def close_pipes(proc: subprocess.Popen[Any]) -> None:
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass


class _Worker:
    def __init__(
        self,
        k: int,
        spec: dict[str, Any],
        log_dir: Path,
        lines: queue.Queue[tuple[int, dict[str, Any] | None]],
    ):
        self.k = k
        self.log = log_dir / f"loadgen-{k}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=str(REPO),
                env=env,
                text=True,
            )
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        self.thread = threading.Thread(target=self._read, args=(lines,), daemon=True)
        self.thread.start()

    def _read(self, lines: queue.Queue[tuple[int, dict[str, Any] | None]]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                lines.put((self.k, json.loads(line)))
            except json.JSONDecodeError:
                continue
        lines.put((self.k, None))

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def stop(self) -> None:
        end_child(self.proc, grace=2.0)  # it exits by itself after its result
        self.thread.join(timeout=5)
        close_pipes(self.proc)

    def stderr_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def _devices(scn: Scenario, target: Target) -> list[list[Any]]:
    run_id = secrets.token_hex(3)
    out: list[list[Any]] = []
    for i in range(scn.connections):
        dev = f"bench-{run_id}-{i}"
        token = proto.device_token(target.secret, dev) if target.secret else ""
        out.append([i, dev, token])
    return out


def run(
    scn: Scenario,
    target: Target,
    log_dir: Path,
    progress: TextIO | None = sys.stderr,
) -> dict[str, Any]:
    """Run ``scn`` against ``target``; returns the merged result (see docs/bench.md)."""
    scn.check()
    target.check()
    log_dir.mkdir(parents=True, exist_ok=True)
    devices = _devices(scn, target)
    nproc = min(scn.processes, scn.connections)
    sources = [f"127.0.0.{1 + (k % 250)}" for k in range(scn.sources)]
    lines: queue.Queue[tuple[int, dict[str, Any] | None]] = queue.Queue()
    workers: list[_Worker] = []
    started = time.time()
    try:
        for k in range(nproc):
            spec = {
                "kind": target.kind,
                "url": target.url,
                "mode": scn.mode,
                "rate": scn.rate,
                "window": scn.window,
                "duration": scn.duration,
                "ramp": scn.ramp / nproc,
                "payload": scn.payload,
                "encoding": scn.encoding,
                "drain": scn.drain,
                "sources": sources,
                "devices": devices[k::nproc],
                "distinct_ts": scn.distinct_ts,
            }
            workers.append(_Worker(k, spec, log_dir, lines))
        return _drive(scn, target, workers, lines, progress, started)
    finally:
        for w in workers:
            w.stop()


def _next(
    lines: queue.Queue[tuple[int, dict[str, Any] | None]],
    deadline: float,
    what: str,
    workers: list[_Worker],
) -> tuple[int, dict[str, Any] | None]:
    try:
        return lines.get(timeout=max(0.01, deadline - time.monotonic()))
    except queue.Empty:
        tails = "\n".join(f"--- loadgen {w.k}:\n{w.stderr_tail()}" for w in workers)
        raise proto.BenchError(f"timed out waiting for {what}\n{tails}") from None


def _drive(
    scn: Scenario,
    target: Target,
    workers: list[_Worker],
    lines: queue.Queue[tuple[int, dict[str, Any] | None]],
    progress: TextIO | None,
    started: float,
) -> dict[str, Any]:
    n = len(workers)
    # ---- ramp: every generator reports "connected"
    connected: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + scn.connections / scn.ramp + 60 + 2 * scn.connections / 1000
    while len(connected) < n:
        k, msg = _next(lines, deadline, "the connection ramp", workers)
        if msg is None:
            raise proto.BenchError(f"load generator {k} exited during the ramp:\n{workers[k].stderr_tail()}")
        if msg.get("type") == "connected":
            connected[k] = msg
    opened = sum(m["open"] for m in connected.values())
    ramp_s = max(m["ramp_s"] for m in connected.values())
    if progress:
        print(
            f"[{target.name}] {opened}/{scn.connections} connections open after {ramp_s:.1f}s", file=progress
        )
    if opened == 0:
        for w in workers:
            w.send({"go": time.time()})
        raise proto.BenchError(f"[{target.name}] no connection could be opened to {target.url}")

    node_lat_before = procstat.scrape_ack_latency(target.metrics) if target.metrics else {}
    sampler = procstat.ProcSampler(list(target.pids))
    gen_sampler = procstat.ProcSampler([w.proc.pid for w in workers])
    sampler.sample(0.0)
    gen_sampler.sample(0.0)
    go = time.time() + 0.5
    for w in workers:
        w.send({"go": go})
    t0 = time.monotonic() + (go - time.time())

    # ---- steady phase: per-second ticks from every generator
    ticks: dict[int, dict[str, Any]] = {}
    results: dict[int, dict[str, Any]] = {}
    ring_depths: list[dict[str, Any]] = []
    stage_counts: list[dict[str, Any]] = []  # iotnode_messages_total by stage, same scrapes
    node_samples: list[dict[str, Any]] = []
    gen_samples: list[dict[str, Any]] = []
    next_sample = t0 + 1.0
    next_metrics = t0
    next_print = t0 + 1.0
    deadline = t0 + scn.duration + scn.drain + 60
    done: set[int] = set()
    while len(done) < n:
        now = time.monotonic()
        if now >= next_sample:
            node_samples.append(sampler.sample(now - t0))
            gen_samples.append(gen_sampler.sample(now - t0))
            next_sample += 1.0
        if target.metrics and now >= next_metrics:
            depths = procstat.scrape_ring_depths(target.metrics)
            if depths:
                ring_depths.append({"t": round(now - t0, 2), **depths})
            counts = procstat.scrape_stage_counts(target.metrics)
            if counts and target.sink_metrics:
                counts.update(procstat.scrape_sink_state(target.sink_metrics))
            if counts:
                stage_counts.append({"t": round(now - t0, 2), **counts})
            next_metrics += scn.metrics_every
        try:
            wake = (
                min(next_sample, next_print, next_metrics) if target.metrics else min(next_sample, next_print)
            )
            k, msg = lines.get(timeout=max(0.01, wake - time.monotonic()))
        except queue.Empty:
            k, msg = -1, None
        if k >= 0:
            if msg is None:
                if k not in results:
                    raise proto.BenchError(f"load generator {k} exited early:\n{workers[k].stderr_tail()}")
                done.add(k)
            elif msg.get("type") == "tick":
                # Keyed by the tick's index, not its (jittery) emission time.
                sec = int(msg.get("k") or max(1, round(msg["t"])))
                agg = ticks.setdefault(
                    sec,
                    {
                        "t": sec,
                        "sent": 0,
                        "acked": 0,
                        "errors": 0,
                        "open": 0,
                        "backlog": 0,
                        "n": 0,
                        "lag_ms": 0.0,
                        "lat": Histogram(),
                    },
                )
                agg["lag_ms"] = max(agg["lag_ms"], msg.get("lag_ms", 0.0))
                for key in ("sent", "acked", "errors", "open", "backlog"):
                    agg[key] += msg[key]
                agg["n"] += 1
                agg["lat"].merge(Histogram.from_json(msg["lat"]))
            elif msg.get("type") == "result":
                results[k] = msg
                done.add(k)
        if progress and time.monotonic() >= next_print:
            next_print += 1.0
            _print_progress(progress, target, scn, ticks, node_samples, gen_samples)
        if time.monotonic() > deadline:
            raise proto.BenchError(
                f"[{target.name}] the run did not finish within {scn.duration + scn.drain + 60:.0f}s"
            )
    node_samples.append(sampler.sample(time.monotonic() - t0))
    result = _merge(
        scn,
        target,
        connected,
        results,
        ticks,
        node_samples,
        gen_samples,
        sampler,
        gen_sampler,
        ring_depths,
        started,
    )
    if target.metrics:
        # The node's own view (received → ack sent): tells the node's time from the network's and ours.
        result["target_ack_latency"] = procstat.bucket_quantiles(
            node_lat_before, procstat.scrape_ack_latency(target.metrics)
        )
        result["stage_counts"] = stage_counts
    return result


def _print_progress(
    out: TextIO,
    target: Target,
    scn: Scenario,
    ticks: dict[int, dict[str, Any]],
    node: list[dict[str, Any]],
    gen: list[dict[str, Any]],
) -> None:
    complete = (
        [sec for sec, t in ticks.items() if t["n"] >= len(gen[-1]["procs"]) or sec < max(ticks)]
        if gen
        else list(ticks)
    )
    if not complete:
        return
    last = ticks[max(complete)]
    p99 = last["lat"].percentile_us(99) / 1000
    node_cpu = sum(p["cpu_pct"] for p in node[-1]["procs"].values()) if node else 0.0
    gen_cpu = sum(p["cpu_pct"] for p in gen[-1]["procs"].values()) if gen else 0.0
    print(
        f"[{target.name} {scn.name}] t={last['t']:>4}/{scn.duration:.0f}s open={last['open']:>6} "
        f"sent/s={last['sent']:>7} acked/s={last['acked']:>7} p99={p99:8.2f}ms backlog={last['backlog']:>6} "
        f"err={last['errors']} lag={last['lag_ms']:.0f}ms target-cpu={node_cpu:5.0f}% "
        f"gen-cpu={gen_cpu:5.0f}%",
        file=out,
        flush=True,
    )


def _merge(
    scn: Scenario,
    target: Target,
    connected: dict[int, dict[str, Any]],
    results: dict[int, dict[str, Any]],
    ticks: dict[int, dict[str, Any]],
    node_samples: list[dict[str, Any]],
    gen_samples: list[dict[str, Any]],
    sampler: procstat.ProcSampler,
    gen_sampler: procstat.ProcSampler,
    ring_depths: list[dict[str, Any]],
    started: float,
) -> dict[str, Any]:
    lat = Histogram()
    conn = Histogram()
    totals = {
        "sent": 0,
        "acked": 0,
        "ack_frames": 0,
        "unacked": 0,
        "in_flight_at_end": 0,
        "errors": 0,
        "reconnects": 0,
        "disconnects": 0,
        "connect_failures": 0,
    }
    cpu_s = 0.0
    max_lag = 0.0
    gc_count, gc_max = [0, 0, 0], [0.0, 0.0, 0.0]
    samples: list[str] = []
    for r in results.values():
        watch = r.get("gc") or {"collections": [0, 0, 0], "max_ms": [0.0, 0.0, 0.0]}
        for g, (n, worst) in enumerate(zip(watch["collections"], watch["max_ms"], strict=True)):
            gc_count[g] += n
            gc_max[g] = max(gc_max[g], worst)
        lat.merge(Histogram.from_json(r["lat"]))
        conn.merge(Histogram.from_json(r["connect"]))
        for key in totals:
            totals[key] += r[key]
        cpu_s += r["cpu_s"]
        max_lag = max(max_lag, r.get("max_lag_ms", 0.0))
        samples.extend(r["error_samples"])
    timeline = []
    for sec in sorted(ticks):
        t = ticks[sec]
        timeline.append(
            {
                "t": sec,
                "sent": t["sent"],
                "acked": t["acked"],
                "errors": t["errors"],
                "open": t["open"],
                "backlog": t["backlog"],
                "p50_ms": round(t["lat"].percentile_us(50) / 1000, 3),
                "p99_ms": round(t["lat"].percentile_us(99) / 1000, 3),
                "max_ms": round(t["lat"].max_us / 1000, 3),
                "gen_lag_ms": t["lag_ms"],
            }
        )
    in_window = [t for t in timeline if t["t"] <= round(scn.duration)]
    acked_window = sum(t["acked"] for t in in_window)
    node_cpu = sampler.cpu_seconds()
    result: dict[str, Any] = {
        "version": 1,
        "scenario": asdict(scn),
        "target": {"name": target.name, "url": target.url, "kind": target.kind, "note": target.note},
        "started_at": round(started, 3),
        "connections_open": sum(m["open"] for m in connected.values()),
        "ramp_s": max(m["ramp_s"] for m in connected.values()),
        "offered_msg_s": round(scn.connections * scn.rate, 1) if scn.mode == "rate" else None,
        "acked_msg_s": round(acked_window / scn.duration, 1),
        **totals,
        "error_samples": samples[:10],
        "latency_ms": lat.summary_ms(),
        "latency_curve_ms": lat.curve_ms(),
        "connect_ms": conn.summary_ms(),
        "timeline": timeline,
        "generator": {
            "processes": len(results),
            "cpu_s": round(cpu_s, 2),
            "cpu_pct_of_one_core": round(100 * cpu_s / scn.duration, 1),
            "max_lag_ms": max_lag,
            # its cyclic-GC collections per generation, and the longest pause of each
            "gc_collections": gc_count,
            "gc_max_ms": gc_max,
            "cpu_us_per_msg": round(1e6 * cpu_s / totals["acked"], 1) if totals["acked"] else None,
            "samples": gen_samples,
        },
        "target_procs": {
            "cpu_s": node_cpu,
            "cpu_s_by_role": procstat.by_role(node_cpu),
            "cpu_pct_of_one_core": round(100 * sum(node_cpu.values()) / scn.duration, 1)
            if node_cpu
            else None,
            "samples": node_samples,
        },
        "ring_depths": ring_depths,
    }
    result["drift"] = drift(result)
    result["warnings"] = warnings(result)
    return result


def warnings(result: dict[str, Any]) -> list[str]:
    """Reasons not to trust a number: a saturated generator, lost messages, errors."""
    out = []
    busiest = 0.0
    for s in result["generator"]["samples"][1:]:
        for p in s["procs"].values():
            busiest = max(busiest, p["cpu_pct"])
    if busiest >= 85.0:
        out.append(
            f"a load-generator process reached {busiest:.0f}% of a core: add --processes, the "
            "generator may be the bottleneck"
        )
    lag = result["generator"].get("max_lag_ms", 0.0)
    if lag >= 100.0:
        out.append(
            f"the generator's pacing ran up to {lag:.0f} ms behind schedule (a busy or starved generator); "
            "those messages still count from their scheduled time, but the target saw them late"
        )
    if result["unacked"]:
        out.append(
            f"{result['unacked']} messages were still unacked {result['scenario']['drain']}s after the end"
        )
    if result["connections_open"] < result["scenario"]["connections"]:
        out.append(
            f"only {result['connections_open']} of {result['scenario']['connections']} connections opened"
        )
    if result["errors"]:
        out.append(f"{result['errors']} errors, e.g. {result['error_samples'][:2]}")
    return out


def drift(result: dict[str, Any]) -> dict[str, Any]:
    """First vs last fifth of the run: p99 latency, throughput, total RSS of the target."""
    tl = result["timeline"]
    if len(tl) < 5:
        return {}
    k = max(1, len(tl) // 5)
    first, last = tl[:k], tl[-k - 1 : -1] if len(tl) > k + 1 else tl[-k:]

    def avg(rows: list[dict[str, Any]], key: str) -> float:
        return round(sum(r[key] for r in rows) / len(rows), 3)

    out: dict[str, Any] = {
        "p99_ms_first": avg(first, "p99_ms"),
        "p99_ms_last": avg(last, "p99_ms"),
        "acked_s_first": avg(first, "acked"),
        "acked_s_last": avg(last, "acked"),
    }
    samples = result["target_procs"]["samples"]
    if len(samples) >= 2:

        def rss(s: dict[str, Any]) -> float:
            return round(sum(p["rss_mb"] for p in s["procs"].values()), 1)

        out["rss_mb_first"] = rss(samples[1] if len(samples) > 2 else samples[0])
        out["rss_mb_last"] = rss(samples[-1])
    return out
