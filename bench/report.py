"""Results on disk: one JSON file per run, its charts, and a self-contained HTML
report (inline SVG, no JavaScript) with the latency percentile curve, throughput
over time, and where the target's CPU went.

The latency-percentile, throughput-over-time and p99-over-time charts are drawn by
matplotlib (Agg canvas, object API: no pyplot state) and written as PNG and SVG
next to the JSON (``<stamp>-<name>-latency.png`` ...); the HTML inlines the SVGs.
The smaller per-target charts (RSS, ring depth) stay hand-drawn SVG.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def save(
    results: list[dict[str, Any]], name: str, out_dir: Path = RESULTS, command: str = ""
) -> tuple[Path, Path]:
    """Write ``<stamp>-<name>.json``, its charts (PNG + SVG) and ``.html``; returns the
    JSON and HTML paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = out_dir / f"{stamp}-{name}"
    doc = {"command": command, "results": results, "table": table_rows(results)}
    json_path = base.with_suffix(".json")
    json_path.write_text(json.dumps(doc, indent=1))
    return json_path, render_files(doc, json_path)[0]


def render_files(doc: dict[str, Any], json_path: Path) -> list[Path]:
    """The HTML report and the charts of a results document, next to its JSON file:
    ``[html, <base>-latency.png, <base>-latency.svg, <base>-throughput.png, ...]``."""
    figs = charts(doc)
    paths = write_charts(figs, json_path.with_suffix(""))
    html_path = json_path.with_suffix(".html")
    html_path.write_text(render_html(doc, figs))
    return [html_path, *paths]


# ------------------------------------------------------------------- matplotlib charts
PERCENTILE_TICKS = (
    (0, "0"),
    (90, "90"),
    (99, "99"),
    (99.9, "99.9"),
    (99.99, "99.99"),
    (99.999, "99.999"),
    (100, "max"),
)


def charts(doc: dict[str, Any]) -> dict[str, Any]:
    """``{"latency": Figure, "throughput": Figure, "p99": Figure}`` of the non-skipped results."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = [r for r in doc["results"] if "skipped" not in r]
    figs: dict[str, Any] = {}

    def figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
        fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.set_title(title, loc="left", fontsize=11, fontweight="bold")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", color="#e6e6e6")
        ax.set_axisbelow(True)
        return fig, ax

    fig, ax = figure("Ack latency by percentile (from the scheduled send time)", "percentile", "ms (log)")
    for i, r in enumerate(results):
        pts = [(_nines(p), v) for p, v in r.get("latency_curve_ms") or [] if v > 0]
        if pts:
            ax.plot(*zip(*pts, strict=True), color=COLORS[i % len(COLORS)], lw=2, label=r["target"]["name"])
    ax.set_yscale("log")
    ax.set_xticks([_nines(p) for p, _ in PERCENTILE_TICKS], [label for _, label in PERCENTILE_TICKS])
    figs["latency"] = _finish(fig, ax)

    fig, ax = figure("Acked messages per second", "seconds", "msg/s")
    for i, r in enumerate(results):
        pts = [(t["t"], t["acked"]) for t in r.get("timeline") or []]
        if pts:
            ax.plot(*zip(*pts, strict=True), color=COLORS[i % len(COLORS)], lw=1.8, label=r["target"]["name"])
    ax.set_ylim(bottom=0)
    figs["throughput"] = _finish(fig, ax)

    fig, ax = figure("p99 ack latency per second", "seconds", "ms (log)")
    for i, r in enumerate(results):
        pts = [(t["t"], t["p99_ms"]) for t in r.get("timeline") or [] if t.get("p99_ms")]
        if pts:
            ax.plot(*zip(*pts, strict=True), color=COLORS[i % len(COLORS)], lw=1.8, label=r["target"]["name"])
    ax.set_yscale("log")
    figs["p99"] = _finish(fig, ax)
    return figs


def _finish(fig: Any, ax: Any) -> Any:
    if ax.get_lines():
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#888")
    return fig


def _svg_settings() -> dict[str, Any]:
    # text as text (small files), stable ids and no date: the same JSON gives the same SVG
    return {"svg.fonttype": "none", "svg.hashsalt": "iotnode-bench"}


def write_charts(figs: dict[str, Any], base: Path) -> list[Path]:
    """``<base>-<name>.png`` and ``.svg`` for each figure."""
    import matplotlib

    paths = []
    with matplotlib.rc_context(_svg_settings()):
        for name, fig in figs.items():
            for ext, extra in (("png", {"dpi": 120}), ("svg", {"metadata": {"Date": None}})):
                path = base.with_name(f"{base.name}-{name}.{ext}")
                fig.savefig(path, format=ext, **extra)
                paths.append(path)
    return paths


def _inline_svg(fig: Any) -> str:
    """A figure as an ``<svg>`` element (XML prolog and doctype removed) for the HTML."""
    import io

    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context(_svg_settings()):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]


# ----------------------------------------------------------------------------- tables
def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per target; ratios against the no-op baseline of the same run."""
    base = next(
        (r for r in results if r.get("target", {}).get("name") == "noop" and "skipped" not in r), None
    )
    node = next(
        (r for r in results if r.get("target", {}).get("name") == "iotnode" and "skipped" not in r), None
    )
    rows = []
    for r in results:
        name = r.get("target", {}).get("name", "?")
        if "skipped" in r:
            rows.append({"target": name, "skipped": r["skipped"]})
            continue
        lat = r["latency_ms"]
        row: dict[str, Any] = {
            "target": name,
            "acked_msg_s": r["acked_msg_s"],
            "p50_ms": lat.get("p50"),
            "p99_ms": lat.get("p99"),
            "p99.9_ms": lat.get("p99.9"),
            "max_ms": lat.get("max"),
            "errors": r["errors"],
            "unacked": r["unacked"],
            "open": r["connections_open"],
            "target_cpu_pct": r["target_procs"]["cpu_pct_of_one_core"],
            "gen_cpu_pct": r["generator"]["cpu_pct_of_one_core"],
        }
        if r.get("thr_vs_noop_rounds") and len(r["thr_vs_noop_rounds"]) > 1:
            per = sorted(x for x in r["thr_vs_noop_rounds"] if x is not None)
            if per:
                row["thr_vs_noop_by_round"] = f"{per[(len(per) - 1) // 2]} ({per[0]}–{per[-1]})"
        if base is not None and base["acked_msg_s"]:
            row["thr_vs_noop"] = round(r["acked_msg_s"] / base["acked_msg_s"], 3)
            bp99 = base["latency_ms"].get("p99") or 0
            row["p99_vs_noop"] = round(lat.get("p99", 0) / bp99, 2) if bp99 else None
        if node is not None and name not in ("iotnode", "noop") and r["acked_msg_s"]:
            row["iotnode_thr_vs_this"] = round(node["acked_msg_s"] / r["acked_msg_s"], 3)
            p99 = lat.get("p99") or 0
            row["iotnode_p99_vs_this"] = round(node["latency_ms"].get("p99", 0) / p99, 2) if p99 else None
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = [
        "target",
        "acked_msg_s",
        "thr_vs_noop",
        "thr_vs_noop_by_round",
        "p50_ms",
        "p99_ms",
        "p99.9_ms",
        "max_ms",
        "p99_vs_noop",
        "iotnode_thr_vs_this",
        "iotnode_p99_vs_this",
        "errors",
        "unacked",
        "open",
        "target_cpu_pct",
        "gen_cpu_pct",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        if "skipped" in row:
            why = " ".join(str(row["skipped"]).split())[:160].replace("|", "/")
            lines.append(f"| {row['target']} | skipped: {why} |" + " |" * (len(cols) - 2))
            continue
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- SVG
def _nines(p: float) -> float:
    return 5.6 if p >= 100 else min(5.0, -math.log10(max(1e-5, 1 - p / 100)))


def svg_chart(
    series: list[tuple[str, list[tuple[float, float]]]],
    title: str,
    xlabel: str,
    ylabel: str,
    ylog: bool = False,
    xticks: list[tuple[float, str]] | None = None,
    width: int = 760,
    height: int = 340,
) -> str:
    left, right, top, bottom = 70, 170, 30, 45
    pw, ph = width - left - right, height - top - bottom
    pts = [(x, y) for _, s in series for x, y in s if (y > 0 or not ylog)]
    if not pts:
        return f"<p>{html.escape(title)}: no data</p>"
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    if xticks:
        x0, x1 = min(x0, xticks[0][0]), max(x1, xticks[-1][0])
    if x1 == x0:
        x1 = x0 + 1
    ys = [p[1] for p in pts]
    if ylog:
        lo = math.floor(math.log10(max(min(ys), 1e-3)))
        hi = math.ceil(math.log10(max(ys) * 1.01))
        hi = max(hi, lo + 1)
        fy = lambda y: top + ph - (math.log10(max(y, 10**lo)) - lo) / (hi - lo) * ph  # noqa: E731
        yticks = [(10.0**e, f"{10.0**e:g}") for e in range(lo, hi + 1)]
    else:
        ymax = max(ys) * 1.1 or 1.0
        fy = lambda y: top + ph - y / ymax * ph  # noqa: E731
        step = 10 ** math.floor(math.log10(ymax / 5)) if ymax > 0 else 1
        while ymax / step > 8:
            step *= 2
        yticks = [(k * step, f"{k * step:g}") for k in range(int(ymax / step) + 1)]
    fx = lambda x: left + (x - x0) / (x1 - x0) * pw  # noqa: E731
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11">',
        f'<text x="{left}" y="18" font-size="13" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>',
    ]
    for y, label in yticks:
        py = fy(y)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py:.1f}" y2="{py:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 5}" y="{py + 4:.1f}" text-anchor="end">{html.escape(label)}</text>')
    if xticks is None:
        step = max(1, round((x1 - x0) / 8))
        xticks = [(x0 + k * step, f"{x0 + k * step:g}") for k in range(int((x1 - x0) / step) + 1)]
    for x, label in xticks:
        px = fx(x)
        out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{top}" y2="{top + ph}" stroke="#eee"/>')
        out.append(f'<text x="{px:.1f}" y="{top + ph + 15}" text-anchor="middle">{html.escape(label)}</text>')
    out.append(
        f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">{html.escape(xlabel)}</text>'
    )
    out.append(
        f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})" '
        f'text-anchor="middle">{html.escape(ylabel)}</text>'
    )
    for i, (name, s) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in s if (y > 0 or not ylog))
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        ly = top + 14 + 16 * i
        out.append(
            f'<line x1="{left + pw + 10}" x2="{left + pw + 30}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" '
            f'stroke-width="3"/>'
        )
        short = name if len(name) <= 22 else "…" + name[-21:]
        out.append(f'<text x="{left + pw + 35}" y="{ly}">{html.escape(short)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def render_html(doc: dict[str, Any], figs: dict[str, Any] | None = None) -> str:
    """The report; ``figs`` from :func:`charts` (drawn here when not given)."""
    results = [r for r in doc["results"] if "skipped" not in r]
    figs = charts(doc) if figs is None else figs
    parts = [
        "<!doctype html><meta charset='utf-8'><title>iotnode bench</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
        "table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f4f4f4}</style>",
        "<h1>iotnode bench</h1>",
        f"<p>Command: <code>{html.escape(doc.get('command', ''))}</code></p>",
    ]
    if doc["results"]:
        scn = doc["results"][0].get("scenario", {})
        parts.append(f"<p>Scenario: <code>{html.escape(json.dumps(scn))}</code></p>")
    parts.append(_html_table(doc["table"]))
    for name in ("latency", "throughput", "p99"):
        parts.append(f"<figure>{_inline_svg(figs[name])}</figure>")
    for r in results:
        parts.append(
            f"<h2>{html.escape(r['target']['name'])}</h2><p>{html.escape(r['target'].get('note', ''))}</p>"
        )
        cpu = r["target_procs"].get("cpu_s_by_role") or r["target_procs"]["cpu_s"]
        if cpu:
            dur = r["scenario"]["duration"]
            rows = "".join(
                f"<tr><td style='text-align:left'>{html.escape(k)}</td>"
                f"<td>{v}</td><td>{100 * v / dur:.0f}%</td></tr>"
                for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])
            )
            parts.append(
                f"<p>Where the target's CPU went (summed per role):</p><table><tr><th>process</th><th>CPU "
                f"s</th><th>% of a core</th></tr>{rows}</table>"
            )
        samples = r["target_procs"].get("samples") or []
        if len(samples) > 2:
            rss: dict[str, list[tuple[float, float]]] = {}
            for smp in samples:
                per_role: dict[str, float] = {}
                for label, p in smp["procs"].items():
                    role = label.rsplit("[", 1)[0].replace("node.workers.", "").replace("bench.servers.", "")
                    per_role[role] = per_role.get(role, 0.0) + p["rss_mb"]
                for role, mb in per_role.items():
                    rss.setdefault(role, []).append((smp["t"], round(mb, 1)))
            top = sorted(rss.items(), key=lambda kv: -max(v for _, v in kv[1]))[:7]
            parts.append(svg_chart(top, f"{r['target']['name']}: RSS per role (MB)", "seconds", "MB"))
        gen = r["generator"]
        parts.append(
            f"<p>Load generator: {gen['processes']} processes, {gen['cpu_s']} CPU-s "
            f"({gen['cpu_pct_of_one_core']}% of one core, {gen.get('cpu_us_per_msg')} µs per acked "
            f"message).</p>"
        )
        if r.get("target_ack_latency"):
            parts.append(
                "<p>The target's own ack latency (iotnode_ack_latency_seconds, received → ack sent): "
                f"<code>{html.escape(json.dumps(r['target_ack_latency']))}</code></p>"
            )
        for w in r.get("warnings", []):
            parts.append(f"<p style='color:#b00'>warning: {html.escape(w)}</p>")
        if r.get("drift"):
            parts.append(
                f"<p>Drift (first vs last fifth): <code>{html.escape(json.dumps(r['drift']))}</code></p>"
            )
        if r.get("ring_depths"):
            depth_series = {}
            for s in r["ring_depths"]:
                for k, v in s.items():
                    if k != "t":
                        depth_series.setdefault(k, []).append((s["t"], v))
            parts.append(svg_chart(list(depth_series.items()), "Ring depth (records)", "seconds", "records"))
        if r.get("error_samples"):
            parts.append(
                "<p>Errors (samples):</p><ul>"
                + "".join(f"<li><code>{html.escape(e)}</code></li>" for e in r["error_samples"])
                + "</ul>"
            )
    for r in doc["results"]:
        if "skipped" in r:
            parts.append(
                f"<p><b>{html.escape(r['target']['name'])}</b> skipped: {html.escape(r['skipped'])}</p>"
            )
    return "\n".join(parts)


def _html_table(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for row in rows:
        for c in row:
            if c not in cols:
                cols.append(c)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(row.get(c, '')))}</td>" for c in cols) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"
