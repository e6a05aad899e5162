"""Per-process CPU and RSS, read from ``/proc`` at scrape time.

prometheus_client's own ``ProcessCollector`` reports only the scraping process
and does not work in multiprocess mode (the web front's workers).  This
collector reports any set of processes, each labelled ``process`` (the Procfile
name, or ``web-supervisor`` for uvicorn's parent process) and ``pid``:

* ``iotnode_process_cpu_seconds_total{process,pid}``  user + system CPU time
* ``iotnode_process_resident_memory_bytes{process,pid}``  resident set size

Nothing is sampled in the background: the numbers are read when scraped, so a
process that is gone simply has no series any more.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ProcessStatsCollector", "is_running", "read_process", "this_process"]

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

# Fields of /proc/PID/stat after the ")" closing the command name (field 3 = index 0).
_UTIME, _STIME, _RSS_PAGES = 11, 12, 21


def read_process(pid: int) -> tuple[float, int] | None:
    """``(cpu_seconds, rss_bytes)`` of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw.rsplit(b")", 1)[1].split()
    cpu = (int(fields[_UTIME]) + int(fields[_STIME])) / _TICKS
    return cpu, int(fields[_RSS_PAGES]) * _PAGE


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a SIGKILLed child its parent
    has not reaped yet is a zombie: it no longer counts as running)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return raw.rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")


class ProcessStatsCollector(Collector):
    """Collects CPU and RSS of the ``(process name, pid)`` pairs ``targets()`` returns."""

    def __init__(self, targets: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self._targets = targets

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        cpu = CounterMetricFamily(
            "iotnode_process_cpu_seconds",
            "User and system CPU time of the process",
            labels=["process", "pid"],
        )
        rss = GaugeMetricFamily(
            "iotnode_process_resident_memory_bytes",
            "Resident set size of the process",
            labels=["process", "pid"],
        )
        for name, pid in self._targets():
            sample = read_process(pid)
            if sample is None:
                continue
            cpu.add_metric([name, str(pid)], sample[0])
            rss.add_metric([name, str(pid)], sample[1])
        yield cpu
        yield rss


def this_process(name: str) -> Callable[[], list[tuple[str, int]]]:
    """Targets for a single-process stage: itself (``os.getpid()`` at scrape time)."""
    return lambda: [(name, os.getpid())]
