"""Private PostgreSQL and VictoriaMetrics servers for the storage tests and ``bench.sinks``.

Both start on a free loopback port in a directory of their own and are stopped by
PID.  PostgreSQL (``initdb`` + ``postgres``) runs as the ``postgres`` user (initdb
refuses root); VictoriaMetrics with ``-dedup.minScrapeInterval=1ms`` (the
VictoriaMetrics sink's exactly-once rule) and a scrape config the caller may fill.
A missing binary raises :class:`MissingServer` (``.ci/run`` installs both).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

VM_BIN = shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics"
PG_USER = "postgres"  # initdb refuses to run as root


class MissingServer(RuntimeError):
    """A server binary is not installed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _pg_bin() -> Path:
    """Debian's PostgreSQL binaries (the newest installed major version), or IOTNODE_PG_BIN."""
    if os.environ.get("IOTNODE_PG_BIN"):
        return Path(os.environ["IOTNODE_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()


class PgServer:
    """A private PostgreSQL cluster (initdb), started and stopped by PID."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        for tool in ("initdb", "postgres"):
            if not (PG_BIN / tool).exists():
                raise MissingServer(f"PostgreSQL's {tool} not found at {PG_BIN / tool}")
        self.root = root
        self.data = root / "pgdata"
        self.port = port or free_port()
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
        _wait(lambda: _port_open(self.port), 30, f"PostgreSQL on port {self.port}")
        _wait(self._accepts, 30, "PostgreSQL to accept connections")

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

    def __init__(self, root: Path, port: int | None = None) -> None:
        if not Path(VM_BIN).exists():
            raise MissingServer(f"victoria-metrics not found at {VM_BIN}")
        self.root = root
        self.port = port or free_port()
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
        _wait(lambda: self._get("/health") == b"OK", 30, "VictoriaMetrics healthy")

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
