"""The whole pipeline, end to end: ``python -m bench e2e`` (docs/bench.md).

Two measurements against one node the harness starts (every process on this
machine), each round in turn, beside a no-op front with the same web workers:

* **sustained throughput device → store**: the closed-loop ``max`` load on the
  no-op front, then on the node.  For the node, ``iotnode_messages_total`` by stage
  is scraped every second during the run (:func:`bench.runner.run`), and the rows
  the store committed (``stage="stored"``) over the steady window give *stored
  msg/s*, next to acked msg/s.  The ring depths right after the window (a growing
  depth: the pipeline does not keep up) and the time the store then needs to catch
  up with every acked message are reported too.  Ratios are to the no-op front's
  acked msg/s of the same round.
* **latency device → fanout client** at fixed offered rates (open loop, e.g.
  1,000 and 5,000 msg/s over 1,000 devices): a client app
  (:mod:`bench.fanout_client`, its own process) follows ``device=*`` on the fanout
  with a ``["*"]`` client token; the latency of a frame is its receive time minus
  the ``ts`` the generator wrote when it sent the message.

With ``--sinks`` (issue 13) the latency part is left out and each round measures
the same closed-loop load on three targets in turn: the no-op front, the node with
its SQLite store only (``iotnode``) and the node with its storage tier on
(``iotnode+sinks``: the ``postgres``, ``victoria`` and ``lake`` processes of
Procfile.storage writing to a private PostgreSQL and VictoriaMetrics on loopback and a
Parquet lake).  For the latter, besides acked and SQLite-stored msg/s: each sink's
rows/s over the same window (``iotnode_sink_rows_total``), its lag behind the SQLite
store when the load stops (``iotnode_sink_lag_records``), the time until it has every
stored row, and then a check of the destinations themselves -- PostgreSQL's
``count(*)``, the lake's rows read by DuckDB, VictoriaMetrics' samples from
``/api/v1/export`` -- against the rows in the SQLite store: each must hold exactly
those rows, each once.  The generator writes device timestamps in strictly increasing
milliseconds per device in this mode (VictoriaMetrics keeps one sample per series and
millisecond).

Only the generator, the client and the node run; all on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from bench import procstat, proto, report, runner, targets
from bench.hist import Histogram
from node.auth import issue_client_token
from node.front.metrics import FLUSH_INTERVAL, RENDER_TTL

DRAIN_TIMEOUT = 60.0  # seconds the store may take to catch up after a run


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "e2e", help="whole node: stored msg/s vs the no-op front, and device → fanout-client latency"
    )
    g = p.add_argument_group("throughput (closed loop, like max)")
    g.add_argument("--connections", "-n", type=int, default=100, help="device connections (100)")
    g.add_argument("--window", "-w", type=int, default=32, help="messages in flight per connection (32)")
    g.add_argument("--duration", "-d", type=float, default=10.0, help="seconds of steady load (10)")
    g.add_argument(
        "--client-during-throughput",
        action="store_true",
        help="a client app follows device=* on the fanout during the node's throughput run too",
    )
    g = p.add_argument_group("latency to the fanout (open loop)")
    g.add_argument("--devices", type=int, default=1000, help="device connections (1000)")
    g.add_argument(
        "--rates", default="1000,5000", help="offered msg/s over all devices, comma-separated (1000,5000)"
    )
    g.add_argument("--latency-duration", type=float, default=10.0, help="seconds per offered rate (10)")
    g = p.add_argument_group("common")
    g.add_argument("--rounds", type=int, default=3, help="rounds, each measuring everything once (3)")
    g.add_argument("--payload", type=int, default=64, help="approximate message size in bytes (64)")
    g.add_argument("--encoding", choices=proto.ENCODINGS, default="msgpack")
    g.add_argument("--processes", "-p", type=int, default=2, help="load-generator processes (2)")
    g.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="web workers of both fronts (CPUs)"
    )
    g.add_argument("--out", type=Path, default=report.RESULTS, help="results directory (bench/results)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    g.add_argument("--keep", type=Path, help="keep the targets' data and logs in this directory")
    g.add_argument(
        "--node-env",
        action="append",
        default=[],
        metavar="NODE_VAR=VALUE",
        help="a setting for the node (repeatable), e.g. NODE_PIPELINE_COALESCE_MS=0",
    )
    g.add_argument(
        "--sinks",
        action="store_true",
        help="throughput only, on three targets per round: no-op front, node with SQLite only, node with"
        " the PostgreSQL, VictoriaMetrics and Parquet sinks on (private servers); checks every sink's rows",
    )


def parse_node_env(items: list[str]) -> dict[str, str]:
    """``--node-env NODE_VAR=VALUE`` options as a dict (only ``NODE_*`` names)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("NODE_"):
            raise proto.BenchError(f"--node-env: expected NODE_VAR=VALUE, got {item!r}")
        out[name] = value
    return out


def parse_rates(text: str) -> list[float]:
    rates = []
    for part in text.split(","):
        try:
            rate = float(part)
        except ValueError:
            raise proto.BenchError(
                f"--rates: expected comma-separated numbers, got {part!r} in {text!r}"
            ) from None
        if not rate > 0:
            raise proto.BenchError(f"--rates: expected msg/s > 0, got {part!r}")
        rates.append(rate)
    return rates


def scenarios(args: argparse.Namespace) -> tuple[runner.Scenario, list[runner.Scenario]]:
    """The throughput scenario and one latency scenario per offered rate."""
    if args.rounds < 1:
        raise proto.BenchError(f"--rounds: expected an integer >= 1, got {args.rounds}")
    common: dict[str, Any] = dict(
        payload=args.payload, encoding=args.encoding, processes=args.processes, metrics_every=1.0
    )
    thr = runner.Scenario(
        name="e2e-max",
        mode="max",
        connections=args.connections,
        window=args.window,
        duration=args.duration,
        ramp=2000.0,
        drain=5.0,
        distinct_ts=bool(getattr(args, "sinks", False)),
        **common,
    )
    if getattr(args, "sinks", False):
        thr.check()
        return thr, []
    lat = [
        runner.Scenario(
            name=f"e2e-{rate:g}",
            mode="rate",
            connections=args.devices,
            rate=rate / args.devices,
            window=1000,
            duration=args.latency_duration,
            ramp=2000.0,
            drain=10.0,
            **common,
        )
        for rate in parse_rates(args.rates)
    ]
    for scn in (thr, *lat):
        scn.check()
    return thr, lat


# ------------------------------------------------------------------ the node's counters
def fanout_metrics_url(target: runner.Target) -> str:
    return target.fanout_url.replace("ws://", "http://", 1).rsplit("/v1/", 1)[0] + "/metrics"


def stored_rate(result: dict[str, Any]) -> dict[str, Any]:
    """Stored (and acked, by the node's own counters) msg/s over the steady window,
    from the per-second ``stage_counts`` scrapes of a :func:`bench.runner.run` result."""
    duration = result["scenario"]["duration"]
    # iotnode_messages_total{stage="stored"} exists from the store's first commit on: a scrape
    # that reached the node (other stages counted) but has no "stored" yet means 0 stored.
    rows = [
        {**s, "stored": s.get("stored", 0.0)}
        for s in result.get("stage_counts", [])
        if -0.5 <= s["t"] <= duration + 0.5 and ("stored" in s or "acked" in s)
    ]
    if len(rows) < 2:
        raise proto.BenchError(
            f"fewer than two scrapes of the store's counter in the window: {result.get('stage_counts')}"
        )
    first, last = rows[0], rows[-1]
    span = last["t"] - first["t"]
    out = {
        "window_s": round(span, 2),
        "stored": int(last["stored"] - first["stored"]),
        "stored_msg_s": round((last["stored"] - first["stored"]) / span, 1) if span > 0 else None,
    }
    if "acked" in first and "acked" in last and span > 0:
        out["node_acked_msg_s"] = round((last["acked"] - first["acked"]) / span, 1)
    return out


#: Web workers flush their counters every FLUSH_INTERVAL and render the merged output at
#: most every RENDER_TTL: a scrape of the web's /metrics is this much behind at most.
WEB_METRICS_LAG = FLUSH_INTERVAL + RENDER_TTL + 0.2


def wait_drained(target: runner.Target, timeout: float = DRAIN_TIMEOUT) -> dict[str, Any]:
    """Wait (bounded) until the store has every message the web front acked and the
    rings are empty; returns how long it took and the counts seen last."""
    t0 = time.monotonic()
    counts: dict[str, float] = {}
    depths: dict[str, float] = {}
    while True:
        counts = procstat.scrape_stage_counts(target.metrics)
        depths = procstat.scrape_ring_depths(target.metrics)
        done = counts.get("stored", 0) >= counts.get("acked", float("inf")) and not any(depths.values())
        if done:
            # The web's counters reach /metrics up to WEB_METRICS_LAG late: take the counts
            # again once they caught up, so acked/received belong to the same moment.
            time.sleep(WEB_METRICS_LAG)
            counts = procstat.scrape_stage_counts(target.metrics)
            depths = procstat.scrape_ring_depths(target.metrics)
            done = counts.get("stored", 0) >= counts.get("acked", float("inf")) and not any(depths.values())
        if done or time.monotonic() - t0 >= timeout:
            return {
                "drained": done,
                "catch_up_s": round(time.monotonic() - t0, 2),
                "acked_total": counts.get("acked"),
                "stored_total": counts.get("stored"),
                "depths": depths,
                "counts": counts,
            }
        time.sleep(0.2)


# ------------------------------------------------------------------ the client app
class FanoutClient:
    """A :mod:`bench.fanout_client` process following every device; measures only
    frames of ``bench-`` devices sent after it connected."""

    def __init__(self, target: runner.Target, log: Path) -> None:
        if not target.fanout_url or not target.secret:
            raise proto.BenchError(f"target {target.name!r} has no fanout stream to follow")
        spec = {
            "url": target.fanout_url,
            "token": issue_client_token(target.secret, ["*"], ttl=3600),
            "prefix": "bench-",
            "since": time.time(),
        }
        env = dict(os.environ)
        env["PYTHONPATH"] = str(runner.REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.fanout_client"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=str(runner.REPO),
                env=env,
                text=True,
            )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._send(json.dumps(spec))
        self._expect("ready", 30.0)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                continue
        self.lines.put(None)

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _expect(self, kind: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                msg = None
                if time.monotonic() < deadline:
                    continue
            if msg is None:
                raise proto.BenchError(
                    f"fanout client: no {kind!r} line (exit {self.proc.poll()}):\n"
                    f"{self.log.read_text(errors='replace')[-2000:]}"
                )
            if msg.get("type") == kind:
                return msg

    def finish(self) -> dict[str, Any]:
        self._send("stop")
        return self._expect("result", 30.0)

    def close(self) -> None:
        runner.end_child(self.proc)
        runner.close_pipes(self.proc)


# ------------------------------------------------------------------ one measurement each
def measure_throughput(
    scn: runner.Scenario,
    noop: runner.Target,
    node: runner.Target,
    log_dir: Path,
    progress: TextIO | None,
    with_client: bool = False,
) -> dict[str, Any]:
    """One round: the no-op front, then the node, same closed-loop load (with a
    client app on the fanout during the node's run if ``with_client``)."""
    base = runner.run(scn, noop, log_dir / "noop", progress)
    client = None
    got: dict[str, Any] = {}
    if with_client:
        wait_drained(node)
        (log_dir / "iotnode").mkdir(parents=True, exist_ok=True)
        client = FanoutClient(node, log_dir / "iotnode" / "fanout-client.log")
    try:
        r = runner.run(scn, node, log_dir / "iotnode", progress)
        end_depths = procstat.scrape_ring_depths(node.metrics)
        stored = stored_rate(r)
        drain = wait_drained(node)
        if client is not None:
            time.sleep(0.5)
            got = client.finish()
    finally:
        if client is not None:
            client.close()
    depths = [d for d in r.get("ring_depths", []) if d["t"] <= scn.duration + 0.5]
    row = {
        "noop_acked_msg_s": base["acked_msg_s"],
        "acked_msg_s": r["acked_msg_s"],
        **stored,
        "acked_vs_noop": round(r["acked_msg_s"] / base["acked_msg_s"], 3) if base["acked_msg_s"] else None,
        "stored_vs_noop": round(stored["stored_msg_s"] / base["acked_msg_s"], 3)
        if base["acked_msg_s"] and stored["stored_msg_s"]
        else None,
        "ingress_depth_end": end_depths.get("ingress"),
        "fanin_depth_end": end_depths.get("fanin"),
        "fanin_depth_max": max((d.get("fanin", 0) for d in depths), default=None),
        "catch_up_s": drain["catch_up_s"],
        "drained": drain["drained"],
        "target_cpu_s_by_role": r["target_procs"]["cpu_s_by_role"],
    }
    if got:
        row["fanout_frames"] = got["frames"]
        row["fanout_p99_ms"] = Histogram.from_json(got["lat"]).summary_ms().get("p99")
        row["fanout_delivered"] = round(got["frames"] / r["acked"], 3) if r["acked"] else None
        row["fanout_client_closed"] = got["closed"]
    return {"row": row, "noop": base, "iotnode": r, "drain": drain}


def measure_latency(
    scn: runner.Scenario, node: runner.Target, log_dir: Path, progress: TextIO | None
) -> dict[str, Any]:
    """Open loop at a fixed offered rate with a client app on the fanout; the
    pipeline is drained first so that no earlier run's frames arrive in this one."""
    before = wait_drained(node)
    log_dir.mkdir(parents=True, exist_ok=True)
    client = FanoutClient(node, log_dir / "fanout-client.log")
    try:
        r = runner.run(scn, node, log_dir, progress)
        drain = wait_drained(node)
        time.sleep(0.5)  # the fanout's last frames after the store's last commit
        got = client.finish()
    finally:
        client.close()
    lat = Histogram.from_json(got["lat"]).summary_ms()
    node_lat = Histogram.from_json(got["node_lat"]).summary_ms() if "node_lat" in got else {}
    row = {
        "offered_msg_s": r["offered_msg_s"],
        "devices": scn.connections,
        "acked_msg_s": r["acked_msg_s"],
        "acked": r["acked"],
        "fanout_frames": got["frames"],
        "delivered": round(got["frames"] / r["acked"], 4) if r["acked"] else None,
        "fanout_p50_ms": lat.get("p50"),
        "fanout_p99_ms": lat.get("p99"),
        "fanout_p999_ms": lat.get("p99.9"),
        "fanout_max_ms": lat.get("max"),
        "node_p50_ms": node_lat.get("p50"),
        "node_p99_ms": node_lat.get("p99"),
        "ack_p50_ms": r["latency_ms"].get("p50"),
        "ack_p99_ms": r["latency_ms"].get("p99"),
        "out_of_order": got["out_of_order"],
        "client_closed": got["closed"],
        "drained": drain["drained"],
        "drained_before": before["drained"],
    }
    return {
        "row": row,
        "iotnode": r,
        "client": {k: v for k, v in got.items() if k not in ("lat", "node_lat")},
        "fanout_latency_ms": lat,
        "node_latency_ms": node_lat,
        "drain": drain,
    }


# ------------------------------------------------------------------ the command
def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return xs[(len(xs) - 1) // 2] if xs else None


def markdown(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row[c]) for c in cols) + " |")
    return "\n".join(lines)


THR_COLS = [
    "round",
    "noop_acked_msg_s",
    "acked_msg_s",
    "stored_msg_s",
    "acked_vs_noop",
    "stored_vs_noop",
    "ingress_depth_end",
    "fanin_depth_end",
    "fanin_depth_max",
    "catch_up_s",
    "fanout_frames",
    "fanout_delivered",
    "fanout_p99_ms",
    "fanout_client_closed",
]
LAT_COLS = [
    "round",
    "offered_msg_s",
    "devices",
    "acked_msg_s",
    "fanout_frames",
    "delivered",
    "fanout_p50_ms",
    "fanout_p99_ms",
    "fanout_p999_ms",
    "fanout_max_ms",
    "node_p50_ms",
    "node_p99_ms",
    "ack_p50_ms",
    "ack_p99_ms",
    "out_of_order",
]


# ------------------------------------------------------------------ --sinks: the storage tier
SINKS = tuple(targets.SINK_PORTS)  # postgres, victoria, lake


def sink_rates(result: dict[str, Any]) -> dict[str, Any]:
    """Each sink's rows made durable per second over the steady window, from the
    ``sink_rows:<sink>`` values of the per-second scrapes (:func:`bench.runner.run`)."""
    duration = result["scenario"]["duration"]
    out: dict[str, Any] = {}
    for sink in SINKS:
        key = f"sink_rows:{sink}"
        rows = [s for s in result.get("stage_counts", []) if -0.5 <= s["t"] <= duration + 0.5 and key in s]
        if len(rows) < 2:
            raise proto.BenchError(f"fewer than two scrapes of the {sink} sink's counter in the window")
        first, last = rows[0], rows[-1]
        span = last["t"] - first["t"]
        out[f"{sink}_rows"] = int(last[key] - first[key])
        out[f"{sink}_rows_s"] = round((last[key] - first[key]) / span, 1) if span > 0 else None
    return out


def store_rowid(path: str) -> int:
    """The SQLite store's last rowid (rows are never deleted: rowids are dense), read-only."""
    import sqlite3

    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT max(rowid) FROM messages").fetchone()[0] or 0)
    finally:
        db.close()


class SinkWatch:
    """From the moment the load stopped: each sink's ``iotnode_sink_rows_total`` every
    0.2 s in a thread, so that the time each sink needed to hold every stored row is
    known even while :func:`wait_drained` is still waiting for the web's counters."""

    def __init__(self, target: runner.Target, ended: float) -> None:
        self.target = target
        self.ended = ended
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            state = procstat.scrape_sink_state(self.target.sink_metrics)
            self.samples.append((time.monotonic() - self.ended, state))
            self.stop.wait(0.2)

    def wait(self, timeout: float = DRAIN_TIMEOUT) -> dict[str, Any]:
        """Call once the SQLite store drained: wait (bounded) until every sink has made
        each stored row durable -- its counter, counted from its start on an empty
        destination, reaches the store's last rowid; then the seconds each needed."""
        last = store_rowid(self.target.stores["sqlite"])
        deadline = time.monotonic() + timeout

        def first_at(sink: str) -> float | None:
            key = f"sink_rows:{sink}"
            return next((round(t, 2) for t, st in self.samples if st.get(key, 0) >= last), None)

        while any(first_at(s) is None for s in SINKS) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.stop.set()
        self.thread.join(timeout=5)
        done = {s: first_at(s) for s in SINKS}
        return {
            "store_rows": last,
            "drained": all(v is not None for v in done.values()),
            **{f"{s}_drain_s": v for s, v in done.items()},
            "state": self.samples[-1][1] if self.samples else {},
        }


def _pg_counts(dsn: str) -> tuple[int, int]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        sql = "SELECT count(*), count(DISTINCT (device_id, seq)) FROM iotnode_messages"
        row = conn.execute(sql).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _lake_counts(lake: str) -> tuple[int, int]:
    import duckdb

    if not list(Path(lake).glob("date=*/type=*/*.parquet")):
        return 0, 0
    ((total, distinct),) = duckdb.sql(
        f"SELECT count(*), count(DISTINCT (device_id, seq)) FROM read_parquet('{lake}/*/*/*.parquet',"
        " hive_partitioning = true)"
    ).fetchall()
    return int(total), int(distinct)


def _vm_counts(url: str) -> tuple[int, int]:
    """Samples of every ``<type>_iotnode_seq`` series (one per message: its value is the
    seq) in ``/api/v1/export``, and the distinct (device, seq) among them."""
    import urllib.parse
    import urllib.request

    with urllib.request.urlopen(f"{url}/internal/force_flush", timeout=30) as resp:
        resp.read()
    query = urllib.parse.urlencode(
        {"match[]": '{__name__=~".+_iotnode_seq"}', "start": "0", "end": str(int(time.time()) + 86400)}
    )
    samples = distinct = 0
    with urllib.request.urlopen(f"{url}/api/v1/export?{query}", timeout=120) as resp:
        for line in resp:
            if line.strip():
                values = json.loads(line)["values"]
                samples += len(values)
                distinct += len(set(values))  # a series is one device: distinct seqs
    return samples, distinct


def verify_stores(target: runner.Target, timeout: float = 20.0) -> dict[str, Any]:
    """Count the rows in the SQLite store and in each destination (each read from the
    destination itself, not from the sinks' counters): every sink must hold exactly the
    stored rows, each once.  VictoriaMetrics makes samples searchable with a delay
    (-search.latencyOffset=1s, its in-memory buffer): its count is retried until
    ``timeout``."""
    import sqlite3

    db = sqlite3.connect(f"file:{target.stores['sqlite']}?mode=ro", uri=True)
    try:
        rows = int(db.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        db.close()
    counts = {"postgres": _pg_counts(target.stores["postgres"]), "lake": _lake_counts(target.stores["lake"])}
    deadline = time.monotonic() + timeout
    while True:
        counts["victoria"] = _vm_counts(target.stores["victoria"])
        if counts["victoria"][0] >= rows or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    out: dict[str, Any] = {"sqlite_rows": rows}
    problems = []
    for sink in SINKS:
        total, distinct = counts[sink]
        out[f"{sink}_rows_total"] = total
        out[f"{sink}_distinct"] = distinct
        if total != rows or distinct != rows:
            problems.append(f"{sink}: {total} rows ({distinct} distinct (device, seq)), the store has {rows}")
    out["exact"] = not problems
    out["problems"] = problems
    return out


def _ratio(x: float | None, base: float | None) -> float | None:
    return round(x / base, 3) if x is not None and base else None


def measure_sinks(
    scn: runner.Scenario,
    noop: runner.Target,
    plain: runner.Target,
    node: runner.Target,
    log_dir: Path,
    progress: TextIO | None,
) -> dict[str, Any]:
    """One ``--sinks`` round: the same closed-loop load on the no-op front, the node with
    SQLite only, then the node with every sink on; the latter drained and checked."""
    base = runner.run(scn, noop, log_dir / "noop", progress)
    sq = runner.run(scn, plain, log_dir / "iotnode", progress)
    sq_stored = stored_rate(sq)
    sq_drain = wait_drained(plain)
    wait_drained(node)
    r = runner.run(scn, node, log_dir / "iotnode+sinks", progress)
    ended = time.monotonic()
    end_sinks = procstat.scrape_sink_state(node.sink_metrics)
    end_depths = procstat.scrape_ring_depths(node.metrics)
    watch = SinkWatch(node, ended)
    try:
        stored = stored_rate(r)
        rates = sink_rates(r)
        drain = wait_drained(node)
        sinks_drain = watch.wait()
    finally:
        watch.stop.set()
    check = verify_stores(node)
    noop_s = base["acked_msg_s"]
    slowest = min([stored["stored_msg_s"] or 0.0] + [rates[f"{s}_rows_s"] or 0.0 for s in SINKS])
    row: dict[str, Any] = {
        "noop_acked_msg_s": noop_s,
        "sqlite_acked_msg_s": sq["acked_msg_s"],
        "sqlite_stored_msg_s": sq_stored["stored_msg_s"],
        "sqlite_stored_vs_noop": _ratio(sq_stored["stored_msg_s"], noop_s),
        "acked_msg_s": r["acked_msg_s"],
        "stored_msg_s": stored["stored_msg_s"],
        "acked_vs_noop": _ratio(r["acked_msg_s"], noop_s),
        "stored_vs_noop": _ratio(stored["stored_msg_s"], noop_s),
        **{f"{s}_rows_s": rates[f"{s}_rows_s"] for s in SINKS},
        **{f"{s}_vs_noop": _ratio(rates[f"{s}_rows_s"], noop_s) for s in SINKS},
        "all_sinks_vs_noop": _ratio(slowest, noop_s),
        **{f"{s}_lag_end": end_sinks.get(f"sink_lag:{s}") for s in SINKS},
        "ingress_depth_end": end_depths.get("ingress"),
        "fanin_depth_end": end_depths.get("fanin"),
        "catch_up_s": drain["catch_up_s"],
        **{f"{s}_drain_s": sinks_drain[f"{s}_drain_s"] for s in SINKS},
        "drained": drain["drained"] and sinks_drain["drained"] and sq_drain["drained"],
        "stores_exact": check["exact"],
        "store_rows": check["sqlite_rows"],
        "target_cpu_s_by_role": r["target_procs"]["cpu_s_by_role"],
        "sqlite_target_cpu_s_by_role": sq["target_procs"]["cpu_s_by_role"],
    }
    return {
        "row": row,
        "noop": base,
        "iotnode": sq,
        "iotnode+sinks": r,
        "drain": drain,
        "sinks_drain": sinks_drain,
        "check": check,
        "window": {**stored, **rates},
    }


SINKS_COLS = [
    "round",
    "noop_acked_msg_s",
    "sqlite_stored_msg_s",
    "sqlite_stored_vs_noop",
    "acked_msg_s",
    "stored_msg_s",
    "acked_vs_noop",
    "stored_vs_noop",
    "postgres_rows_s",
    "victoria_rows_s",
    "lake_rows_s",
    "all_sinks_vs_noop",
    "postgres_lag_end",
    "victoria_lag_end",
    "lake_lag_end",
    "catch_up_s",
    "postgres_drain_s",
    "victoria_drain_s",
    "lake_drain_s",
    "store_rows",
    "stores_exact",
]
SINKS_SUMMARY = [
    "sqlite_stored_vs_noop",
    "acked_vs_noop",
    "stored_vs_noop",
    "postgres_vs_noop",
    "victoria_vs_noop",
    "lake_vs_noop",
    "all_sinks_vs_noop",
]


def run_sinks(
    args: argparse.Namespace, workdir: Path, command: str, progress: TextIO | None
) -> dict[str, Any]:
    thr, _ = scenarios(args)
    extra = parse_node_env(getattr(args, "node_env", []))
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    with (
        targets.start("noop", workdir / "noop", args.workers) as noop,
        targets.start("iotnode", workdir / "iotnode", args.workers, extra) as plain,
        targets.start("iotnode+sinks", workdir / "iotnode+sinks", args.workers, extra) as node,
    ):
        for k in range(args.rounds):
            if progress:
                print(
                    f"--- e2e --sinks round {k + 1}/{args.rounds}: no-op, iotnode (SQLite), iotnode+sinks",
                    file=progress,
                )
            m = measure_sinks(thr, noop, plain, node, workdir / "logs" / f"sinks-{k}", progress)
            rows.append({"round": k + 1, **m["row"]})
            raw.append(m)
            if not m["check"]["exact"]:
                raise proto.BenchError(
                    f"round {k + 1}: a sink does not hold exactly the stored rows: {m['check']['problems']}"
                )
        notes = {"noop": noop.note, "iotnode": plain.note, "iotnode+sinks": node.note}
    summary: dict[str, Any] = {}
    for key in SINKS_SUMMARY:
        xs = [r[key] for r in rows if r[key] is not None]
        summary[f"{key}_median"] = _median(xs)
        summary[f"{key}_range"] = [min(xs), max(xs)] if xs else None
    summary["stores_exact"] = all(r["stores_exact"] for r in rows)
    doc = {
        "command": command,
        "tree": str(runner.REPO),
        "mode": "sinks",
        "targets": notes,
        "throughput": rows,
        "latency": [],
        "summary": summary,
        "runs": raw,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-e2e-sinks.json"
    path.write_text(json.dumps(doc, indent=1))
    doc["path"] = str(path)
    return doc


def run(args: argparse.Namespace, workdir: Path, command: str, progress: TextIO | None) -> dict[str, Any]:
    if getattr(args, "sinks", False):
        return run_sinks(args, workdir, command, progress)
    thr, lats = scenarios(args)
    thr_rows: list[dict[str, Any]] = []
    lat_rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    with (
        targets.start("noop", workdir / "noop", args.workers) as noop,
        targets.start(
            "iotnode", workdir / "iotnode", args.workers, parse_node_env(getattr(args, "node_env", []))
        ) as node,
    ):
        for k in range(args.rounds):
            if progress:
                print(f"--- e2e round {k + 1}/{args.rounds}: throughput (no-op, then iotnode)", file=progress)
            t = measure_throughput(
                thr,
                noop,
                node,
                workdir / "logs" / f"thr-{k}",
                progress,
                with_client=getattr(args, "client_during_throughput", False),
            )
            thr_rows.append({"round": k + 1, **t["row"]})
            raw.append(t)
            for scn in lats:
                if progress:
                    print(
                        f"--- e2e round {k + 1}/{args.rounds}: fanout latency at "
                        f"{scn.connections * scn.rate:g} msg/s",
                        file=progress,
                    )
                m = measure_latency(scn, node, workdir / "logs" / f"{scn.name}-{k}", progress)
                lat_rows.append({"round": k + 1, **m["row"]})
                raw.append(m)
    summary = {
        "stored_vs_noop_median": _median([r["stored_vs_noop"] for r in thr_rows]),
        "acked_vs_noop_median": _median([r["acked_vs_noop"] for r in thr_rows]),
        "stored_vs_noop_range": [
            min((r["stored_vs_noop"] or 0) for r in thr_rows),
            max((r["stored_vs_noop"] or 0) for r in thr_rows),
        ],
    }
    doc = {"command": command, "throughput": thr_rows, "latency": lat_rows, "summary": summary, "runs": raw}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-e2e.json"
    path.write_text(json.dumps(doc, indent=1))
    doc["path"] = str(path)
    return doc


def print_doc(doc: dict[str, Any], out: TextIO = sys.stdout) -> None:
    if doc.get("mode") == "sinks":
        print(markdown(doc["throughput"], SINKS_COLS), file=out)
        s = doc["summary"]
        print("\nvs the no-op front's acked msg/s, median of rounds (min–max):", file=out)
        for key in SINKS_SUMMARY:
            lo_hi = s[f"{key}_range"] or [None, None]
            print(f"  {key}: {s[f'{key}_median']} ({lo_hi[0]}–{lo_hi[1]})", file=out)
        print(f"every sink holds exactly the stored rows after each round: {s['stores_exact']}", file=out)
        print(f"results: {doc['path']}", file=out)
        return
    print(markdown(doc["throughput"], THR_COLS), file=out)
    print(file=out)
    print(markdown(doc["latency"], LAT_COLS), file=out)
    s = doc["summary"]
    print(
        f"\nstored vs no-op (median of rounds): {s['stored_vs_noop_median']} "
        f"(range {s['stored_vs_noop_range'][0]}–{s['stored_vs_noop_range'][1]}); "
        f"acked vs no-op: {s['acked_vs_noop_median']}",
        file=out,
    )
    print(f"results: {doc['path']}", file=out)
