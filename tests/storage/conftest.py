"""Real destinations for the storage tier: private PostgreSQL and VictoriaMetrics servers.

Both are session-scoped: started once on free loopback ports in temporary
directories, stopped by PID at the end.  Missing binaries fail (never skip) with
a message saying that ``.ci/run`` installs them.  Helpers fill a real SQLite store
(contract 5, through ``SqliteSink``) the way the ``store`` process does.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.record import Record
from node.sinks.sqlite import SqliteSink
from tests.support import free_port, wait_for_port, wait_until


def _pg_bin() -> Path:
    """Debian's PostgreSQL binaries (the newest installed major version), or IOTNODE_PG_BIN."""
    if os.environ.get("IOTNODE_PG_BIN"):
        return Path(os.environ["IOTNODE_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
VM_BIN = shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics"
PG_USER = "postgres"  # initdb refuses to run as root
RING = b"\x01" * 16  # the fan-in ring id the helper's store rows pretend to come from


def _missing(what: str, path: str) -> None:
    pytest.fail(
        f"{what} not found at {path}: the storage tests need it; .ci/run installs it"
        " (apt-get install postgresql victoria-metrics)",
        pytrace=False,
    )


class PgServer:
    """A private PostgreSQL cluster (initdb), started and stopped by PID."""

    def __init__(self, root: Path) -> None:
        for tool in ("initdb", "postgres"):
            if not (PG_BIN / tool).exists():
                _missing(f"PostgreSQL's {tool}", str(PG_BIN / tool))
        self.root = root
        self.data = root / "pgdata"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        user = pwd.getpwnam(PG_USER)
        self.uid, self.gid = user.pw_uid, user.pw_gid
        os.chown(root, self.uid, self.gid)
        self._as_user(
            [str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "iotnode", "-A", "trust", "-E", "UTF8"]
        )

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=iotnode dbname=postgres connect_timeout=3"

    def _as_user(self, cmd: list[str]) -> None:
        out = subprocess.run(
            cmd, user=self.uid, group=self.gid, capture_output=True, timeout=120, cwd=str(self.root)
        )
        assert out.returncode == 0, f"{cmd[0]} failed: {out.stderr.decode()[-2000:]}"

    def start(self) -> None:
        log = open(self.root / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            [
                str(PG_BIN / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.root),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "shared_buffers=32MB",
                "-c",
                "max_connections=20",
            ],
            user=self.uid,
            group=self.gid,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(self.root),
            start_new_session=True,
        )
        log.close()
        wait_for_port(self.port, 30)
        wait_until(self._accepts, 30, 0.1, "PostgreSQL to accept connections")

    def _accepts(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.dsn):
                return True
        except psycopg.Error:
            return False

    def stop(self, sig: int = signal.SIGINT) -> None:
        """SIGINT: fast shutdown; SIGQUIT: immediate (crash-like: recovery from WAL at start)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn) as conn:
            return conn.execute(sql, params).fetchall()

    def reset(self) -> None:
        """Drop what the sink created (tests share the server)."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS iotnode_messages CASCADE")
            conn.execute("DROP TABLE IF EXISTS iotnode_sink_cursor")


class VmServer:
    """A private VictoriaMetrics (single node), dedup at 1 ms, scraping ``scrape.yml`` when asked."""

    def __init__(self, root: Path) -> None:
        if not Path(VM_BIN).exists():
            _missing("victoria-metrics", VM_BIN)
        self.root = root
        self.port = free_port()
        self.scrape_config = root / "scrape.yml"
        self.scrape_config.write_text("scrape_configs: []\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.root / "vm.log", "ab")
        self.proc = subprocess.Popen(
            [
                VM_BIN,
                f"-storageDataPath={self.root / 'vmdata'}",
                f"-httpListenAddr=127.0.0.1:{self.port}",
                "-dedup.minScrapeInterval=1ms",
                "-search.latencyOffset=1s",
                "-retentionPeriod=100y",
                f"-promscrape.config={self.scrape_config}",
                "-promscrape.configCheckInterval=1s",
                "-loggerLevel=WARN",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for_port(self.port, 30)
        wait_until(lambda: self._get("/health") == b"OK", 30, 0.1, "VictoriaMetrics healthy")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def _get(self, path: str) -> bytes:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as resp:
                data: bytes = resp.read()
                return data
        except OSError:
            return b""

    def get_json(self, path: str, **params: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(params)}", timeout=20) as resp:
            return json.loads(resp.read())

    def export(self, match: str) -> list[dict[str, Any]]:
        """Every raw sample of the series matching ``match`` (``/api/v1/export``)."""
        query = urllib.parse.urlencode({"match[]": match, "start": "0", "end": str(int(time.time()) + 86400)})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{query}", timeout=30) as resp:
            return [json.loads(line) for line in resp.read().splitlines() if line.strip()]

    def reload_scrape_config(self) -> None:
        """Apply ``scrape.yml`` now (SIGHUP; -promscrape.configCheckInterval also picks it up)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)

    def flush(self) -> None:
        """Make just-written samples searchable (``/internal/force_flush``)."""
        self._get("/internal/force_flush")

    def delete_all(self) -> None:
        query = urllib.parse.urlencode({"match[]": '{__name__=~".+"}'})
        with urllib.request.urlopen(f"{self.url}/api/v1/admin/tsdb/delete_series?{query}", timeout=30):
            pass


def _server_root(name: str) -> Path:
    # Not under pytest's root-only tmp dir: the postgres user must be able to enter it.
    return Path(tempfile.mkdtemp(prefix=f"iotnode-{name}-"))


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    root = _server_root("pg")
    server = PgServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def vm() -> Iterator[VmServer]:
    root = _server_root("vm")
    server = VmServer(root)
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
