"""What the system under test costs: CPU and RSS of its processes (from /proc) and
the ring depths it exports on ``/metrics`` (iotnode contract 6), sampled while a
scenario runs.  Reads only; never signals a process.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_CLK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> tuple[str, int, float] | None:
    """(comm, ppid, cpu seconds) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process below them (uvicorn workers, honcho's children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                children.setdefault(st[1], []).append(int(entry.name))
    out: list[int] = []
    todo = list(roots)
    seen: set[int] = set()
    while todo and len(out) < 10_000:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        if Path(f"/proc/{pid}").exists():
            out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def role(pid: int, depth: int = 0) -> str:
    """A stable name for what a process does: its ``-m module``, its program name, or
    ``<parent role>/worker`` for a multiprocessing child (uvicorn's workers)."""
    cmd = cmdline(pid)
    if "multiprocessing" in cmd and depth < 5:
        st = _stat(pid)
        what = "resource_tracker" if "resource_tracker" in cmd else "worker"
        return f"{role(st[1], depth + 1) if st else '?'}/{what}"
    m = re.search(r"-m ([\w.]+)", cmd)
    if m:
        return m.group(1)
    return (cmd.split() or ["?"])[0].rsplit("/", 1)[-1]


def _label(pid: int) -> str:
    return f"{role(pid)}[{pid}]"


def by_role(cpu: dict[str, float]) -> dict[str, float]:
    """Sum per-process values (``role[pid]`` keys) per role."""
    out: dict[str, float] = {}
    for label, value in cpu.items():
        r = label.rsplit("[", 1)[0]
        out[r] = round(out.get(r, 0.0) + value, 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@dataclass
class ProcSampler:
    """Per-second CPU% and RSS for each process under ``roots``."""

    roots: list[int]
    samples: list[dict[str, object]] = field(default_factory=list)
    _last: dict[int, tuple[float, float]] = field(default_factory=dict)
    _first: dict[int, float] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)

    def sample(self, t: float) -> dict[str, object]:
        now = time.monotonic()
        procs: dict[str, dict[str, float]] = {}
        for pid in descendants(self.roots):
            st = _stat(pid)
            if st is None:
                continue
            if pid not in self.labels:
                self.labels[pid] = _label(pid)
            cpu = st[2]
            self._first.setdefault(pid, cpu)
            prev = self._last.get(pid)
            pct = 100.0 * (cpu - prev[1]) / (now - prev[0]) if prev and now > prev[0] else 0.0
            self._last[pid] = (now, cpu)
            procs[self.labels[pid]] = {"cpu_pct": round(pct, 1), "rss_mb": round(rss_bytes(pid) / 2**20, 1)}
        s: dict[str, object] = {"t": round(t, 2), "procs": procs}
        self.samples.append(s)
        return s

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds each process used since its first sample."""
        return {
            self.labels[pid]: round(last[1] - self._first[pid], 2)
            for pid, last in self._last.items()
            if pid in self._first
        }


def _scrape(urls: list[str], timeout: float) -> Iterator[str]:
    """The text of each ``/metrics`` URL that answers; a URL off loopback is refused."""
    for url in urls:
        host = url.split("//", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        if not host.startswith("127.") and host != "localhost":
            raise ValueError(f"metrics URL must be on loopback, got {url!r}")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
                yield resp.read().decode(errors="replace")
        except OSError:
            continue


_METRIC = re.compile(r'^(iotnode_ring_depth)\{[^}]*ring="([^"]+)"[^}]*\}\s+([0-9.eE+-]+)', re.M)


def scrape_ring_depths(urls: list[str], timeout: float = 1.0) -> dict[str, float]:
    """``iotnode_ring_depth{ring=...}`` from each ``/metrics`` URL that answers (loopback only)."""
    depths: dict[str, float] = {}
    for text in _scrape(urls, timeout):
        for _name, ring, value in _METRIC.findall(text):
            depths[ring] = max(depths.get(ring, 0.0), float(value))
    return depths


_STAGE = re.compile(r'^iotnode_messages_total\{[^}]*stage="([^"]+)"[^}]*\}\s+([0-9.eE+-]+)', re.M)


def scrape_stage_counts(urls: list[str], timeout: float = 1.0) -> dict[str, float]:
    """``iotnode_messages_total{stage=...}`` summed over the ``/metrics`` URLs that
    answer (loopback only), e.g. ``{"acked": ..., "stored": ..., "streamed": ...}``."""
    out: dict[str, float] = {}
    for text in _scrape(urls, timeout):
        for stage, value in _STAGE.findall(text):
            out[stage] = out.get(stage, 0.0) + float(value)
    return out


_SINK = re.compile(
    r'^iotnode_sink_(rows_total|lag_records)\{[^}]*sink="([^"]+)"[^}]*\}\s+([0-9.eE+-]+)', re.M
)


def scrape_sink_state(urls: list[str], timeout: float = 1.0) -> dict[str, float]:
    """Each storage sink's ``iotnode_sink_rows_total`` and ``iotnode_sink_lag_records``
    from the sink processes' ``/metrics`` that answer (loopback only), keyed
    ``sink_rows:<sink>`` and ``sink_lag:<sink>`` (e.g. ``sink_rows:postgres``)."""
    out: dict[str, float] = {}
    for text in _scrape(urls, timeout):
        for metric, sink, value in _SINK.findall(text):
            key = f"{'sink_rows' if metric == 'rows_total' else 'sink_lag'}:{sink}"
            out[key] = out.get(key, 0.0) + float(value)
    return out


_BUCKET = re.compile(r'^iotnode_ack_latency_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\}\s+([0-9.eE+-]+)', re.M)


def scrape_ack_latency(urls: list[str], timeout: float = 1.0) -> dict[str, float]:
    """The node's own ``iotnode_ack_latency_seconds`` buckets (message received → ack
    sent), cumulative counts by ``le``, summed over the URLs that answer."""
    out: dict[str, float] = {}
    for text in _scrape(urls, timeout):
        for le, value in _BUCKET.findall(text):
            out[le] = out.get(le, 0.0) + float(value)
    return out


def bucket_quantiles(
    before: dict[str, float], after: dict[str, float], qs: tuple[float, ...] = (0.5, 0.99)
) -> dict[str, str]:
    """Quantiles of the observations between two scrapes, as the bucket bound they fall
    under (``"<= 0.005 s"``); Prometheus buckets give no finer answer."""
    delta = sorted(
        ((float("inf") if le == "+Inf" else float(le)), after[le] - before.get(le, 0.0)) for le in after
    )
    if not delta or delta[-1][1] <= 0:
        return {}
    total = delta[-1][1]
    out = {}
    for q in qs:
        for bound, cum in delta:
            if cum >= q * total:
                out[f"p{q * 100:g}"] = f"<= {bound:g} s" if bound != float("inf") else f"> {delta[-2][0]:g} s"
                break
    out["count"] = str(int(total))
    return out
