"""Real destinations for the storage tier: private PostgreSQL and VictoriaMetrics servers.

Both are session-scoped: started once on free loopback ports in temporary
directories, stopped by PID at the end.  Missing binaries fail (never skip) with
a message saying that ``.ci/run`` installs them.  Helpers fill a real SQLite store
(contract 5, through ``SqliteSink``) the way the ``store`` process does.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.servers.storage import MissingServer, PgServer, VmServer
from node.record import Record
from node.sinks.sqlite import SqliteSink

RING = b"\x01" * 16  # the fan-in ring id the helper's store rows pretend to come from


def _missing(exc: MissingServer) -> None:
    pytest.fail(
        f"{exc}: the storage tests need it; .ci/run installs it"
        " (apt-get install postgresql victoria-metrics)",
        pytrace=False,
    )


def _server_root(name: str) -> Path:
    # Not under pytest's root-only tmp dir: the postgres user must be able to enter it.
    return Path(tempfile.mkdtemp(prefix=f"iotnode-{name}-"))


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    root = _server_root("pg")
    try:
        server = PgServer(root)
    except MissingServer as exc:
        _missing(exc)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def vm() -> Iterator[VmServer]:
    root = _server_root("vm")
    try:
        server = VmServer(root)
    except MissingServer as exc:
        _missing(exc)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


class StoreFiller:
    """Writes contract-5 rows into a real ``store.sqlite3`` as the store process does.

    Devices ``dev0..dev{n-1}``; data ``{"v": seq, "x": 1.5, "s": "text"}``; device ts =
    ``base + seq`` seconds (distinct per device, so each is one VictoriaMetrics sample).
    """

    def __init__(
        self, path: Path, devices: int = 10, prefix: str = "dev", base_ts: float | None = None
    ) -> None:
        self.sink = SqliteSink(path, "process")
        self.sink.open()
        self.devices = [f"{prefix}{i}" for i in range(devices)]
        self.next_seq = {d: 0 for d in self.devices}
        self.base_ts = time.time() - 3600 if base_ts is None else base_ts
        self.written: list[tuple[str, int]] = []
        self._cursor = 0
        self._lock = threading.Lock()
        self._thread = threading.get_ident()

    def write(self, count: int, batch: int = 500) -> None:
        with self._lock:
            if threading.get_ident() != self._thread:  # SQLite connections stay in their thread
                self.sink = SqliteSink(self.sink.path, "process")  # the old one is left to the GC
                self.sink.open()
                self._thread = threading.get_ident()
            for start in range(0, count, batch):
                records = []
                for i in range(min(batch, count - start)):
                    dev = self.devices[(len(self.written) + i) % len(self.devices)]
                    seq = self.next_seq[dev]
                    self.next_seq[dev] = seq + 1
                    records.append(
                        Record(
                            dev, seq, self.base_ts + seq * 0.01, time.time(), {"v": seq, "x": 1.5, "s": "t"}
                        )
                    )
                self._cursor += 1
                self.sink.write(records, RING, self._cursor)
                self.written.extend((r.device_id, r.seq) for r in records)

    def close(self) -> None:
        with self._lock:
            if threading.get_ident() == self._thread:
                self.sink.close()


class Feeder(threading.Thread):
    """Writes ``total`` rows into the store at about ``rate`` rows/s (bounded in time)."""

    def __init__(self, filler: StoreFiller, total: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.filler, self.total, self.rate = filler, total, rate
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            step = max(1, int(self.rate / 20))
            started = time.monotonic()
            done = 0
            while done < self.total and time.monotonic() - started < 120:
                n = min(step, self.total - done)
                self.filler.write(n, batch=n)
                done += n
                delay = started + done / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        except BaseException as exc:  # reported by the test
            self.error = exc
