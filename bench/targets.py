"""Systems under test, each started and stopped by the harness on loopback.

``noop``      the baseline front (:mod:`bench.servers.front`, sink noop)
``iotnode``   the whole node (``honcho start`` in the repository, private data dir)
``iotnode+sinks``  the whole node and its storage tier (Procfile + Procfile.storage:
              ``postgres``, ``victoria``, ``lake``) writing to a private PostgreSQL
              and VictoriaMetrics on loopback and a Parquet lake in the data dir
``redis``     ``redis-server`` (appendonly, appendfsync always) + a front that XADDs
``mosquitto`` Mosquitto with a WebSocket listener and persistence, MQTT QoS 1
``front-pmem``  iotnode's ``web`` alone (issue 3: the front against the no-op), its
              ingress ring on /dev/shm with ``PMEM_IS_PMEM_FORCE=1`` (the libpmem path)
``front-msync`` iotnode's ``web`` alone, its ingress ring in the private data dir
              (libpmem's msync on an ordinary file: the fallback's figure)

Every target gets a private temporary directory and free ports, and is checked to
listen on loopback only (their listening sockets, read from /proc) before any load is sent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import procstat
from bench.proto import BenchError
from bench.runner import REPO, Target

NAMES = ("noop", "iotnode", "iotnode+sinks", "redis", "mosquitto", "front-pmem", "front-msync")
#: The storage sinks of ``iotnode+sinks`` (Procfile.storage) and their metrics ports.
SINK_PORTS = {
    "postgres": "NODE_METRICS_PORT_POSTGRES",
    "victoria": "NODE_METRICS_PORT_VICTORIA",
    "lake": "NODE_METRICS_PORT_LAKE",
}
#: The lake's flush period in the bench (its default is 60 s or 100,000 rows): a 10 s run
#: would otherwise see at most one flush; ``node_extra`` may set another.
BENCH_LAKE_FLUSH_SECONDS = "1"
# The front alone has no monitor draining its ring: big enough for a run at full speed.
FRONT_RING_BYTES = 256 << 20
SECRET = "bench-secret-0123456789abcdef-0123456789"


class Skip(BenchError):
    """The target cannot run on this machine (its server is not installed); says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(
                f"server exited with status {proc.returncode} before listening on {port}:\n{_tail(log)}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout}s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-3000:]
    except OSError:
        return ""


def _socket_inodes(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def _hex_addr(hexaddr: str) -> str:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{int(port, 16)}"
    # /proc/net/tcp6 stores four host-order 32-bit words
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{int(port, 16)}"


def listening_addresses(pids: list[int]) -> list[str]:
    """``addr:port`` of every listening TCP socket of these processes and their
    children, read from /proc (what ``ss -ltnp`` shows), e.g. ``127.0.0.1:8000``."""
    inodes: set[int] = set()
    for pid in procstat.descendants(pids):
        inodes |= _socket_inodes(pid)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[9]) in inodes:  # 0A: LISTEN
                found.append(_hex_addr(f[1]))
    return sorted(set(found))


def check_loopback_only(name: str, pids: list[int]) -> list[str]:
    addrs = listening_addresses(pids)
    if not addrs:
        raise BenchError(f"{name}: no listening socket found for processes {pids}")
    public = [a for a in addrs if not a.startswith(("127.", "[::1]:", "[::ffff:127."))]
    if public:
        raise BenchError(f"{name} listens beyond loopback: {public}; refusing to load it")
    return addrs


class _Group:
    """Processes of one target; each in its own session, stopped by process group."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cleanup: list[Callable[[], None]] = []  # run after the processes stopped

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path = REPO
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / f"{name}.log"
        full_env = dict(os.environ if env is None else env)
        full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                argv, cwd=str(cwd), env=full_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        return proc, log

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
        for undo in self.cleanup:
            undo()


def front_argv(
    port: int,
    workers: int,
    sink: str = "noop",
    redis_port: int = 0,
    ack_delay_ms: float = 0.0,
    coalesce: bool = False,
    close_after: int = 0,
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "bench.servers.front",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--secret",
        SECRET,
        "--sink",
        sink,
    ]
    if redis_port:
        argv += ["--redis-port", str(redis_port)]
    if ack_delay_ms:
        argv += ["--ack-delay-ms", str(ack_delay_ms)]
    if coalesce:
        argv.append("--coalesce")
    if close_after:
        argv += ["--close-after", str(close_after)]
    return argv


@contextlib.contextmanager
def start(
    name: str, workdir: Path, workers: int, node_extra: dict[str, str] | None = None, **front_opts: object
) -> Iterator[Target]:
    """Start target ``name`` under ``workdir``; yields its :class:`Target`; stops it on exit.
    ``node_extra``: more ``NODE_*`` variables for the ``iotnode`` target (e.g. a tunable)."""
    if name not in NAMES:
        raise BenchError(f"unknown target {name!r}: expected one of {', '.join(NAMES)}")
    workdir.mkdir(parents=True, exist_ok=True)
    group = _Group(workdir)
    try:
        if name == "noop":
            port = free_port()
            proc, log = group.start("noop", front_argv(port, workers, "noop", **front_opts))  # type: ignore[arg-type]
            wait_for_port(port, proc, log)
            target = Target(
                "noop",
                f"ws://127.0.0.1:{port}/v1/ingest",
                secret=SECRET,
                pids=[proc.pid],
                note=f"uvicorn+Starlette, {workers} workers, ack without persisting",
            )
        elif name == "redis":
            exe = shutil.which("redis-server")
            if exe is None:
                raise Skip("redis: redis-server is not installed (Debian package redis-server)")
            rport = free_port()
            rdir = workdir / "redis"
            rdir.mkdir(exist_ok=True)
            rproc, rlog = group.start(
                "redis-server",
                [
                    exe,
                    "--port",
                    str(rport),
                    "--bind",
                    "127.0.0.1",
                    "--protected-mode",
                    "yes",
                    "--dir",
                    str(rdir),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--save",
                    "",
                    "--daemonize",
                    "no",
                ],
            )
            wait_for_port(rport, rproc, rlog)
            port = free_port()
            proc, log = group.start("redis-front", front_argv(port, workers, "redis", redis_port=rport))
            wait_for_port(port, proc, log)
            target = Target(
                "redis",
                f"ws://127.0.0.1:{port}/v1/ingest",
                secret=SECRET,
                pids=[rproc.pid, proc.pid],
                note=f"uvicorn+Starlette ({workers} workers) → XADD, redis-server appendfsync always",
            )
        elif name == "mosquitto":
            exe = shutil.which("mosquitto") or (
                "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
            )
            if exe is None:
                raise Skip("mosquitto: not installed (Debian package mosquitto)")
            port = free_port()
            mdir = workdir / "mosquitto"
            mdir.mkdir(exist_ok=True)
            conf = mdir / "mosquitto.conf"
            conf.write_text(
                "\n".join(
                    [
                        "per_listener_settings false",
                        # Mosquitto 2.0.x will not start with a websockets listener alone
                        # (eclipse-mosquitto/mosquitto#2284): add a loopback MQTT one.
                        f"listener {free_port()} 127.0.0.1",
                        "protocol mqtt",
                        # libwebsockets takes the listener "address" as an interface name:
                        # "127.0.0.1" still binds every interface, "lo" binds loopback.
                        f"listener {port} lo",
                        "protocol websockets",
                        "allow_anonymous true",
                        "persistence true",
                        f"persistence_location {mdir}/",
                        "autosave_interval 1",
                        "max_inflight_messages 0",
                        "max_queued_messages 1000000",
                        "user root",
                        "log_type error",
                        "log_type warning",
                        "",
                    ]
                )
            )
            proc, log = group.start("mosquitto", [exe, "-c", str(conf)])
            wait_for_port(port, proc, log)
            target = Target(
                "mosquitto",
                f"ws://127.0.0.1:{port}/mqtt",
                kind="mqtt",
                pids=[proc.pid],
                note="Mosquitto, WebSocket listener, persistence on (autosave 1 s; PUBACK is not an fsync)",
            )
        elif name in ("front-pmem", "front-msync"):
            target = _start_front(group, workdir, workers, pmem=name == "front-pmem")
        else:  # iotnode, iotnode+sinks
            if not (REPO / "node" / "workers" / "web.py").exists():
                raise Skip("iotnode: node/workers/web.py does not exist yet (the web front has not landed)")
            target = _start_iotnode(group, workdir, workers, node_extra or {}, sinks=name == "iotnode+sinks")
        target.note = target.note or ""
        check_loopback_only(name, target.pids)
        yield target
    finally:
        group.stop()


#: The ports a whole node listens on (each gets a free loopback port).
NODE_PORTS = (
    "NODE_WEB_PORT",
    "NODE_FANOUT_PORT",
    "NODE_METRICS_PORT_MONITOR",
    "NODE_METRICS_PORT_ROUTER",
    "NODE_METRICS_PORT_PUBLISHER",
    "NODE_METRICS_PORT_STORE",
)


def node_env(
    data: Path, workers: int, ports: tuple[str, ...], **extra: str
) -> tuple[dict[str, str], dict[str, int]]:
    """The environment of a node the harness starts on loopback: this process's
    environment without any ``NODE_*``, a free port for each of ``ports``, ``extra`` last."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("NODE_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    chosen = {var: free_port() for var in ports}
    env.update({k: str(v) for k, v in chosen.items()})
    env.update(
        NODE_DATA_DIR=str(data),
        NODE_HOST="127.0.0.1",
        NODE_JWT_SECRET=SECRET,
        NODE_WEB_WORKERS=str(workers),
        NODE_LOG_LEVEL="warning",
    )
    env.update(extra)  # --node-env may set any of the above too (e.g. NODE_LOG_LEVEL=info)
    return env, chosen


def start_honcho(tree: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``honcho start`` of ``tree``'s Procfile in its own process group, output to ``log``
    (the node's processes import ``tree``'s code: ``PYTHONPATH`` and the working dir)."""
    env = {
        **env,
        "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        "PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "honcho", "start", "-f", str(tree / "Procfile"), "-d", str(tree)],
            env=env, cwd=str(tree), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM the process group of ``proc`` (honcho and the node), SIGKILL it if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start_front(group: _Group, workdir: Path, workers: int, pmem: bool) -> Target:
    """iotnode's device front alone (``python -m node.workers.web``), nothing draining its ring."""
    if pmem:
        data = Path(f"/dev/shm/iotnode-bench-{os.getpid()}-{workdir.name}")
        group.cleanup.append(lambda: shutil.rmtree(data, ignore_errors=True))
    else:
        data = workdir / "data"
    data.mkdir(exist_ok=True)
    env, ports = node_env(data, workers, ("NODE_WEB_PORT",), NODE_INGRESS_RING_BYTES=str(FRONT_RING_BYTES))
    port = ports["NODE_WEB_PORT"]
    if pmem:
        env["PMEM_IS_PMEM_FORCE"] = "1"
    proc, log = group.start("front", [sys.executable, "-m", "node.workers.web"], env=env)
    wait_for_port(port, proc, log, timeout=60)
    backend = "libpmem on /dev/shm (PMEM_IS_PMEM_FORCE=1)" if pmem else "libpmem msync on the data dir"
    return Target(
        "front-pmem" if pmem else "front-msync",
        f"ws://127.0.0.1:{port}/v1/ingest",
        secret=SECRET,
        pids=[proc.pid],
        metrics=[f"http://127.0.0.1:{port}/metrics"],
        note=f"web front alone, {workers} workers, ingress ring {backend}",
    )


def _start_storage_servers(group: _Group, workdir: Path) -> dict[str, Any]:
    """A private PostgreSQL and VictoriaMetrics on loopback (:mod:`bench.servers.storage`),
    stopped after the node.  PostgreSQL runs as ``postgres``, which cannot enter a
    root-only temporary directory: its cluster is in a directory of its own under the
    system's temporary directory, removed at the end (its log is copied to ``workdir``)."""
    from bench.servers.storage import MissingServer, PgServer, VmServer

    pg_root = Path(tempfile.mkdtemp(prefix="iotnode-bench-pg-"))
    try:
        pg = PgServer(pg_root)
        vm_root = workdir / "vm"
        vm_root.mkdir(exist_ok=True)
        vm = VmServer(vm_root)
    except MissingServer as exc:
        shutil.rmtree(pg_root, ignore_errors=True)
        raise Skip(f"iotnode+sinks: {exc} (Debian packages postgresql, victoria-metrics)") from None

    def stop_pg() -> None:
        pg.stop()
        with contextlib.suppress(OSError):
            shutil.copy(pg_root / "postgres.log", workdir / "postgres.log")
        shutil.rmtree(pg_root, ignore_errors=True)

    # Stopped after the node's processes (cleanup runs after them), PostgreSQL last.
    group.cleanup.append(vm.stop)
    group.cleanup.append(stop_pg)
    pg.start()
    vm.start()
    return {"pg": pg, "vm": vm}


def _start_iotnode(
    group: _Group, workdir: Path, workers: int, extra: dict[str, str], sinks: bool = False
) -> Target:
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    procfile = REPO / "Procfile"
    stores = {"sqlite": str(data / "store.sqlite3")}
    servers: dict[str, Any] = {}
    ports_wanted = NODE_PORTS
    if sinks:
        servers = _start_storage_servers(group, workdir)
        lake = data / "lake"
        stores.update(postgres=servers["pg"].dsn, victoria=servers["vm"].url, lake=str(lake))
        extra = {
            "NODE_PG_DSN": servers["pg"].dsn,
            "NODE_VM_URL": servers["vm"].url,
            "NODE_LAKE_DIR": str(lake),
            "NODE_LAKE_FLUSH_SECONDS": BENCH_LAKE_FLUSH_SECONDS,
            **extra,
        }
        ports_wanted = NODE_PORTS + tuple(SINK_PORTS.values())
        # One honcho for the node and its storage tier: the two Procfiles, as they are.
        procfile = workdir / "Procfile.bench"
        procfile.write_text(
            (REPO / "Procfile").read_text().rstrip("\n") + "\n" + (REPO / "Procfile.storage").read_text()
        )
    env, ports = node_env(data, workers, ports_wanted, **extra)
    names = [
        line.split(":", 1)[0]
        for line in procfile.read_text().splitlines()
        if ":" in line and not line.startswith("#")
    ]
    present = [n for n in names if (REPO / "node" / "workers" / f"{n}.py").exists()]
    proc, log = group.start(
        "iotnode",
        [sys.executable, "-m", "honcho", "start", "-f", str(procfile), "-d", str(REPO), *present],
        env=env,
    )
    wait_for_port(ports["NODE_WEB_PORT"], proc, log, timeout=60)
    metrics = [f"http://127.0.0.1:{ports['NODE_WEB_PORT']}/metrics"] + [
        f"http://127.0.0.1:{ports[v]}/metrics"
        for v in (
            "NODE_METRICS_PORT_MONITOR",
            "NODE_METRICS_PORT_ROUTER",
            "NODE_METRICS_PORT_PUBLISHER",
            "NODE_METRICS_PORT_STORE",
        )
    ]
    sink_metrics = [f"http://127.0.0.1:{ports[v]}/metrics" for v in SINK_PORTS.values() if v in ports]
    for port in (ports[v] for v in SINK_PORTS.values() if v in ports):
        wait_for_port(port, proc, log, timeout=60)
    missing = sorted(set(names) - set(present))
    note = f"honcho start ({', '.join(present)}), {workers} web workers"
    if sinks:
        note += "; private PostgreSQL and VictoriaMetrics on loopback, Parquet lake in the data dir"
    if extra:
        note += "; " + " ".join(
            f"{k}={'<dsn>' if k == 'NODE_PG_DSN' else v}" for k, v in sorted(extra.items())
        )
    if missing:
        note += f"; not yet built, not running: {', '.join(missing)}"
    pids = [proc.pid] + [s.proc.pid for s in servers.values() if s.proc is not None]
    return Target(
        "iotnode+sinks" if sinks else "iotnode",
        f"ws://127.0.0.1:{ports['NODE_WEB_PORT']}/v1/ingest",
        secret=SECRET,
        pids=pids,
        metrics=metrics,
        note=note,
        fanout_url=f"ws://127.0.0.1:{ports['NODE_FANOUT_PORT']}/v1/stream",
        sink_metrics=sink_metrics,
        stores=stores,
    )
