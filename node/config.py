"""Node configuration: every environment variable, read once, typed, failing loudly.

``Settings.from_env()`` is the only place in the package that reads ``NODE_*``
variables.  Each process calls :func:`load_settings` once at start; a bad value
raises :class:`ConfigError` naming the variable and the offending value, and the
process entry points turn that into a clear message and a non-zero exit.

Precedence: the process environment beats the embedded default.  There is no
``.env`` file: the defaults alone run a working node (see README, "Configuration").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from node.errors import ConfigError
from node.keyfile import KeyFileError, resolve_server_key

T = TypeVar("T")

MIB = 1024 * 1024

# ipc:// endpoints are Unix socket paths; Linux limits them to 107 bytes.
_IPC_PATH_MAX = 107


def _parse_int(name: str, raw: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    try:
        value = int(raw.strip(), 10)
    except ValueError:
        raise ConfigError(name, raw, "expected an integer") from None
    if minimum is not None and value < minimum:
        raise ConfigError(name, raw, f"expected an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, raw, f"expected an integer <= {maximum}")
    return value


def _parse_float(name: str, raw: str, *, minimum: float | None = None) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(name, raw, "expected a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(name, raw, "expected a finite number")
    if minimum is not None and value < minimum:
        raise ConfigError(name, raw, f"expected a number >= {minimum}")
    return value


def _milliseconds_between(lo: float, hi: float) -> Callable[[str, str], float]:
    """Milliseconds in ``[lo, hi]``, returned in seconds."""

    def parse(name: str, raw: str) -> float:
        value = _parse_float(name, raw, minimum=lo)
        if value > hi:
            raise ConfigError(name, raw, f"expected a number of milliseconds <= {hi:g}")
        return value / 1000.0

    return parse


def _parse_port(name: str, raw: str) -> int:
    return _parse_int(name, raw, minimum=1, maximum=65535)


def _parse_ring_bytes(name: str, raw: str) -> int:
    value = _parse_int(name, raw, minimum=MIB)
    if value & (value - 1):
        raise ConfigError(name, raw, "expected a power of two (e.g. 67108864 for 64 MiB)")
    return value


def _parse_endpoint(name: str, raw: str) -> str:
    value = raw.strip()
    if value.startswith("ipc://"):
        path = value[len("ipc://") :]
        if not path:
            raise ConfigError(name, raw, "expected ipc://PATH with a non-empty path")
        if len(path.encode()) > _IPC_PATH_MAX:
            raise ConfigError(
                name, raw, f"ipc:// path is {len(path.encode())} bytes, the limit is {_IPC_PATH_MAX}"
            )
        return value
    if value.startswith("tcp://"):
        host, sep, port = value[len("tcp://") :].rpartition(":")
        if not sep or not host:
            raise ConfigError(name, raw, "expected tcp://HOST:PORT")
        try:
            _parse_port(name, port)
        except ConfigError as exc:
            raise ConfigError(name, raw, f"port: {exc.reason}") from None
        return value
    raise ConfigError(name, raw, "expected an ipc:// or tcp:// endpoint")


def _parse_choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ConfigError(name, raw, f"expected one of {', '.join(choices)}")
        return value

    return parse


def _parse_switch(name: str, raw: str) -> bool:
    return _parse_choice(("on", "off"))(name, raw) == "on"


def _int_between(minimum: int, maximum: int) -> Callable[[str, str], int]:
    return lambda name, raw: _parse_int(name, raw, minimum=minimum, maximum=maximum)


def _seconds_from(minimum: float) -> Callable[[str, str], float]:
    return lambda name, raw: _parse_float(name, raw, minimum=minimum)


def _parse_names(name: str, raw: str) -> tuple[str, ...]:
    """A comma-separated list of subscriber names (letters, digits, ``_``, ``-``)."""
    names = tuple(part.strip() for part in raw.split(","))
    for part in names:
        if not part or not all(c.isascii() and (c.isalnum() or c in "_-") for c in part):
            raise ConfigError(name, raw, f"expected comma-separated names of [A-Za-z0-9_-], got {part!r}")
    return tuple(dict.fromkeys(names))


def _parse_curve_key(name: str, raw: str) -> bytes:
    """A CURVE public key: Z85 text (40 characters) or the path of a key file (node/curve.py)."""
    try:
        return resolve_server_key(raw)
    except KeyFileError as exc:
        raise ConfigError(name, raw, str(exc)) from None


def _parse_directory(name: str, raw: str) -> Path:
    path = Path(raw.strip())
    if not path.is_dir():
        raise ConfigError(name, raw, "expected an existing directory (of *.key public key files)")
    return path


def _parse_file(name: str, raw: str) -> Path:
    path = Path(raw.strip())
    if not path.is_file():
        raise ConfigError(name, raw, "expected an existing file")
    return path


_LOOPBACK_HOSTS = ("localhost", "[::1]", "::1")


def _is_loopback_tcp(endpoint: str) -> bool:
    host = endpoint[len("tcp://") :].rpartition(":")[0]
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


def _parse_registry(name: str, raw: str) -> Path:
    """The device registry file (node/registry.py): parsed by the storage sinks, checked here."""
    path = Path(raw.strip())
    if path.suffix.lower() not in (".csv", ".json"):
        raise ConfigError(name, raw, "expected a .csv or .json file (README, 'Storage tier')")
    if not path.is_file():
        raise ConfigError(name, raw, "expected an existing file")
    return path


def _parse_pg_dsn(name: str, raw: str) -> str:
    # A DSN may hold a password: never echo it (the sink checks the syntax with libpq's parser).
    value = raw.strip()
    if not value:
        raise ConfigError(name, "<hidden>", "expected a libpq connection string or postgresql:// URI")
    return value


def _parse_http_url(name: str, raw: str) -> str:
    from urllib.parse import urlsplit

    value = raw.strip().rstrip("/")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(name, raw, f"expected http://HOST:PORT: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, raw, "expected http://HOST:PORT or https://HOST:PORT")
    if parts.query or parts.fragment or parts.password:
        raise ConfigError(name, raw, "expected a base URL without query, fragment or password")
    return value


#: Shortest accepted HS256 key (RFC 7518 3.2: a key at least as long as the hash, 256 bits).
MIN_SECRET_BYTES = 32


def _parse_secret(name: str, raw: str) -> str:
    size = len(raw.encode("utf-8", "surrogateescape"))
    if size < MIN_SECRET_BYTES:
        # The value itself is a secret: never echo it.
        raise ConfigError(
            name,
            "<hidden>",
            f"expected at least {MIN_SECRET_BYTES} bytes, got {size}"
            " (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')",
        )
    return raw


def _parse_milliseconds(name: str, raw: str) -> int:
    return _parse_int(name, raw, minimum=0, maximum=24 * 3600 * 1000)


@dataclass(frozen=True)
class Settings:
    """All configuration of a node.  Field docs are mirrored in the README."""

    data_dir: Path = Path("./data")
    host: str = "127.0.0.1"
    web_port: int = 8000
    fanout_port: int = 8001
    web_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    jwt_secret: str | None = field(default=None, repr=False)  # None: generated into data_dir
    max_message_bytes: int = 65536
    metrics_port_monitor: int = 9101
    metrics_port_router: int = 9102
    metrics_port_publisher: int = 9103
    metrics_port_store: int = 9104

    # Rings
    ingress_ring_bytes: int = 64 * MIB
    fanin_ring_bytes: int = 256 * MIB
    # "power": persist (libpmem flush / msync) before acking -- survives power loss.
    # "process": ack once the record is in the shared mapping -- survives any process
    # crash (the page cache holds it) but not a kernel crash or power loss.
    durability: str = "power"

    # ZeroMQ endpoints (None: ipc:// sockets inside data_dir)
    router_bind: str | None = None  # router's ROUTER socket
    router_connect: str | None = None  # where monitor connects (default: router_bind)
    pub_bind: str | None = None  # publisher's PUB socket
    replay_bind: str | None = None  # publisher's ROUTER for replay requests and confirms
    pub_connect: str | None = None  # where the fanout connects (default: pub_bind)
    replay_connect: str | None = None  # where the store connects (default: replay_bind)

    # CURVE on tcp:// links (node/curve.py, docs/monitor-router.md).  "off" runs them
    # unauthenticated and unencrypted (a loud warning at start; isolated lab networks only).
    curve: bool = True
    curve_server_key: bytes | None = None  # Z85 public key of the router a monitor connects to over tcp://
    curve_clients_dir: Path | None = None  # *.key public keys of the monitors a tcp:// router accepts
    curve_publisher_key: bytes | None = None  # Z85 public key of the publisher a store/fanout connects to
    curve_subscribers_dir: Path | None = None  # *.key public keys of the stores/fanouts a publisher accepts

    # Device connections
    ws_ping_interval: float = 20.0  # seconds of silence before a keep-alive ping; 0 disables them
    ws_ping_timeout: float = 20.0
    conn_window: int = 256  # unacked messages in flight per device connection

    # Fanout
    fanout_queue: int = 1024  # messages buffered per client app before it is told it is too slow

    # Publisher / store
    durable_subscribers: tuple[str, ...] = ("store",)  # names whose CONFIRM the publisher waits for
    pub_hwm: int = 20000  # ZeroMQ high-water mark (messages) of the publisher's XPUB and the fanout's SUB
    pub_heartbeat: float = 5.0  # seconds between the live stream's heartbeats (and one per new subscription)

    # Monitor (ingress ring -> router) and router (-> fan-in ring); docs/monitor-router.md
    monitor_batch_records: int = 256  # records per BATCH message
    monitor_batch_bytes: int = 1 * MIB  # payload bytes per BATCH (a larger single record still goes alone)
    monitor_window: int = 8  # BATCH messages in flight (sent, not yet acked)
    monitor_ack_timeout: float = 1.0  # seconds without an ack before the window is resent
    monitor_ack_timeout_max: float = 8.0  # the resend timeout doubles up to this while nothing is acked
    router_gather_batches: int = 32  # BATCH messages appended with one append_batch (one persist)
    router_gather_bytes: int = 4 * MIB  # ... or fewer, once they hold this many bytes
    router_rcvhwm: int = 64  # BATCH messages ZeroMQ queues per monitor before the monitor's sends wait
    # Seconds a drained monitor/publisher waits after a record is committed before it
    # reads (node/pipeline/doorbell.py): fewer, larger batches down the pipeline.
    pipeline_coalesce: float = 0.005
    # Shortest time between two persists of one web worker's group commit while records are
    # flowing (node/front/committer.py): fewer, larger groups; a lone record persists at once.
    web_commit_interval: float = 0.001

    # Storage tier (README, "Storage tier"): external sinks tailing the SQLite store; None: not configured
    device_registry: Path | None = None  # CSV/JSON device context for enrichment (node/registry.py)
    pg_dsn: str | None = field(default=None, repr=False)  # PostgreSQL sink
    vm_url: str | None = None  # VictoriaMetrics sink (base URL; Influx line protocol to /write)
    lake_dir: Path | None = None  # Parquet lake sink
    lake_flush_rows: int = 100_000  # rows buffered before the lake writes its files
    lake_flush_seconds: float = 60.0  # ... or after this long, whichever first
    sink_batch_rows: int = 5000  # rows per PostgreSQL / VictoriaMetrics write
    metrics_port_postgres: int = 9105
    metrics_port_victoria: int = 9106
    metrics_port_lake: int = 9107

    log_level: str = "info"

    # Hostile clients (docs/security.md): limits of the web and fanout servers, each
    # enforced per server process (a web worker, the fanout).
    metrics_host: str = "127.0.0.1"  # where the stages' /metrics listen (not NODE_HOST)
    max_header_bytes: int = 16384  # request line + headers; more: HTTP 431
    handshake_timeout: float = 10.0  # seconds from TCP accept to the first response
    max_connections: int = 16384  # open connections per server process; more: HTTP 503
    max_connections_per_ip: int = 8192  # open connections per client address per server process
    ws_max_queued_frames: int = 32  # frames parsed but not taken by the app before reading pauses
    ws_max_unwritten_bytes: int = 256 * 1024  # bytes waiting to be written before reading pauses
    tcp_user_timeout_ms: int = 60_000  # TCP_USER_TIMEOUT of accepted connections; 0: kernel default
    jwt_require_exp: bool = False  # refuse tokens without exp (contract 3 honours exp "when present")
    jwt_max_ttl: float | None = None  # refuse tokens whose exp is further than this from now (s)
    jwt_denylist: Path | None = None  # file of denied subjects / not-before times, re-read on change
    fanout_queue_bytes: int = 8 * MIB  # bytes of JSON queued per client app before 1013

    # Metrics: "off" skips the web front's per-group work (ack latency, persist batch
    # sizes, counters sync); its /metrics then shows only CPU/RSS.  The stages count
    # once per batch either way (docs/metrics.md).
    metrics: bool = True

    # ------------------------------------------------------------------ derived
    @property
    def data_path(self) -> Path:
        return self.data_dir.resolve()

    def ring_path(self, name: str) -> Path:
        return self.data_path / f"{name}.ring"

    @property
    def store_path(self) -> Path:
        return self.data_path / "store.sqlite3"

    @property
    def jwt_secret_path(self) -> Path:
        return self.data_path / "jwt_secret"

    def _ipc(self, name: str) -> str:
        return f"ipc://{self.data_path / name}"

    @property
    def router_bind_endpoint(self) -> str:
        return self.router_bind or self._ipc("router.sock")

    @property
    def router_connect_endpoint(self) -> str:
        return self.router_connect or self.router_bind_endpoint

    @property
    def pub_endpoint(self) -> str:
        return self.pub_bind or self._ipc("pub.sock")

    @property
    def replay_endpoint(self) -> str:
        return self.replay_bind or self._ipc("replay.sock")

    @property
    def pub_connect_endpoint(self) -> str:
        return self.pub_connect or self.pub_endpoint

    @property
    def replay_connect_endpoint(self) -> str:
        return self.replay_connect or self.replay_endpoint

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}

        def take(var: str, attr: str, parse: Callable[[str, str], T]) -> None:
            raw = env.get(var)
            if raw is None or raw == "":
                return
            values[attr] = parse(var, raw)

        take("NODE_DATA_DIR", "data_dir", lambda n, r: Path(r))
        take("NODE_HOST", "host", lambda n, r: r.strip())
        take("NODE_WEB_PORT", "web_port", _parse_port)
        take("NODE_FANOUT_PORT", "fanout_port", _parse_port)
        take("NODE_WEB_WORKERS", "web_workers", lambda n, r: _parse_int(n, r, minimum=1, maximum=256))
        take("NODE_JWT_SECRET", "jwt_secret", _parse_secret)
        take(
            "NODE_MAX_MESSAGE_BYTES",
            "max_message_bytes",
            lambda n, r: _parse_int(n, r, minimum=64, maximum=16 * MIB),
        )
        take("NODE_METRICS_PORT_MONITOR", "metrics_port_monitor", _parse_port)
        take("NODE_METRICS_PORT_ROUTER", "metrics_port_router", _parse_port)
        take("NODE_METRICS_PORT_PUBLISHER", "metrics_port_publisher", _parse_port)
        take("NODE_METRICS_PORT_STORE", "metrics_port_store", _parse_port)
        take("NODE_INGRESS_RING_BYTES", "ingress_ring_bytes", _parse_ring_bytes)
        take("NODE_FANIN_RING_BYTES", "fanin_ring_bytes", _parse_ring_bytes)
        take("NODE_DURABILITY", "durability", _parse_choice(("power", "process")))
        take("NODE_ROUTER_BIND", "router_bind", _parse_endpoint)
        take("NODE_ROUTER_CONNECT", "router_connect", _parse_endpoint)
        take("NODE_PUB_BIND", "pub_bind", _parse_endpoint)
        take("NODE_REPLAY_BIND", "replay_bind", _parse_endpoint)
        take("NODE_PUB_CONNECT", "pub_connect", _parse_endpoint)
        take("NODE_REPLAY_CONNECT", "replay_connect", _parse_endpoint)
        take("NODE_CURVE", "curve", lambda n, r: _parse_choice(("on", "off"))(n, r) == "on")
        take("NODE_CURVE_SERVER_KEY", "curve_server_key", _parse_curve_key)
        take("NODE_CURVE_CLIENTS_DIR", "curve_clients_dir", _parse_directory)
        take("NODE_CURVE_PUBLISHER_KEY", "curve_publisher_key", _parse_curve_key)
        take("NODE_CURVE_SUBSCRIBERS_DIR", "curve_subscribers_dir", _parse_directory)
        take("NODE_WS_PING_INTERVAL", "ws_ping_interval", lambda n, r: _parse_float(n, r, minimum=0))
        take("NODE_WS_PING_TIMEOUT", "ws_ping_timeout", lambda n, r: _parse_float(n, r, minimum=0))
        take("NODE_CONN_WINDOW", "conn_window", lambda n, r: _parse_int(n, r, minimum=1, maximum=65536))
        take("NODE_FANOUT_QUEUE", "fanout_queue", lambda n, r: _parse_int(n, r, minimum=1, maximum=1_000_000))
        take("NODE_DURABLE_SUBSCRIBERS", "durable_subscribers", _parse_names)
        take("NODE_PUB_HWM", "pub_hwm", lambda n, r: _parse_int(n, r, minimum=1, maximum=10_000_000))
        take("NODE_PUB_HEARTBEAT_MS", "pub_heartbeat", _milliseconds_between(50, 60_000))
        take("NODE_MONITOR_BATCH_RECORDS", "monitor_batch_records", _int_between(1, 65536))
        take("NODE_MONITOR_BATCH_BYTES", "monitor_batch_bytes", _int_between(1024, 64 * MIB))
        take("NODE_MONITOR_WINDOW", "monitor_window", _int_between(1, 1024))
        take("NODE_MONITOR_ACK_TIMEOUT", "monitor_ack_timeout", _seconds_from(0.01))
        take("NODE_MONITOR_ACK_TIMEOUT_MAX", "monitor_ack_timeout_max", _seconds_from(0.01))
        take("NODE_ROUTER_GATHER_BATCHES", "router_gather_batches", _int_between(1, 4096))
        take("NODE_ROUTER_GATHER_BYTES", "router_gather_bytes", _int_between(1024, 1024 * MIB))
        take("NODE_ROUTER_RCVHWM", "router_rcvhwm", _int_between(1, 1_000_000))
        take("NODE_PIPELINE_COALESCE_MS", "pipeline_coalesce", _milliseconds_between(0, 1000))
        take("NODE_WEB_COMMIT_INTERVAL_MS", "web_commit_interval", _milliseconds_between(0, 100))
        take("NODE_DEVICE_REGISTRY", "device_registry", _parse_registry)
        take("NODE_PG_DSN", "pg_dsn", _parse_pg_dsn)
        take("NODE_VM_URL", "vm_url", _parse_http_url)
        take("NODE_LAKE_DIR", "lake_dir", lambda n, r: Path(r.strip()))
        take("NODE_LAKE_FLUSH_ROWS", "lake_flush_rows", _int_between(1, 10_000_000))
        take("NODE_LAKE_FLUSH_SECONDS", "lake_flush_seconds", _seconds_from(0.1))
        take("NODE_SINK_BATCH_ROWS", "sink_batch_rows", _int_between(1, 100_000))
        take("NODE_METRICS_PORT_POSTGRES", "metrics_port_postgres", _parse_port)
        take("NODE_METRICS_PORT_VICTORIA", "metrics_port_victoria", _parse_port)
        take("NODE_METRICS_PORT_LAKE", "metrics_port_lake", _parse_port)
        take(
            "NODE_LOG_LEVEL",
            "log_level",
            _parse_choice(("critical", "error", "warning", "info", "debug")),
        )
        take("NODE_METRICS", "metrics", lambda n, r: _parse_choice(("on", "off"))(n, r) == "on")
        take("NODE_METRICS_HOST", "metrics_host", lambda n, r: r.strip())
        take("NODE_MAX_HEADER_BYTES", "max_header_bytes", _int_between(1024, MIB))
        take("NODE_HANDSHAKE_TIMEOUT", "handshake_timeout", _seconds_from(0.1))
        take("NODE_MAX_CONNECTIONS", "max_connections", _int_between(1, 10_000_000))
        take("NODE_MAX_CONNECTIONS_PER_IP", "max_connections_per_ip", _int_between(1, 10_000_000))
        take("NODE_WS_MAX_QUEUED_FRAMES", "ws_max_queued_frames", _int_between(1, 65536))
        take("NODE_WS_MAX_UNWRITTEN_BYTES", "ws_max_unwritten_bytes", _int_between(4096, 1024 * MIB))
        take("NODE_TCP_USER_TIMEOUT_MS", "tcp_user_timeout_ms", _parse_milliseconds)
        take("NODE_JWT_REQUIRE_EXP", "jwt_require_exp", _parse_switch)
        take("NODE_JWT_MAX_TTL", "jwt_max_ttl", _seconds_from(1))
        take("NODE_JWT_DENYLIST", "jwt_denylist", _parse_file)
        take("NODE_FANOUT_QUEUE_BYTES", "fanout_queue_bytes", _int_between(4096, 64 * 1024 * MIB))
        # The resend timeout's ceiling: at least the timeout (raised to it when not set).
        timeout = values.get("monitor_ack_timeout", cls.monitor_ack_timeout)
        ceiling = values.get("monitor_ack_timeout_max")
        assert isinstance(timeout, float)
        if ceiling is None:
            values["monitor_ack_timeout_max"] = max(cls.monitor_ack_timeout_max, timeout)
        elif isinstance(ceiling, float) and ceiling < timeout:
            raise ConfigError(
                "NODE_MONITOR_ACK_TIMEOUT_MAX",
                env["NODE_MONITOR_ACK_TIMEOUT_MAX"],
                f"expected a number >= NODE_MONITOR_ACK_TIMEOUT ({timeout:g})",
            )
        settings = cls(**values)  # type: ignore[arg-type]
        settings._check_derived()
        return settings

    def _check_derived(self) -> None:
        # Default ipc:// endpoints live in data_dir: a long data_dir path breaks them.
        for var, endpoint in (
            ("NODE_DATA_DIR", self._ipc("sessions/4194304.sock")),  # node/front/sessions.py, per worker
            ("NODE_DATA_DIR", self.router_bind_endpoint),
            ("NODE_DATA_DIR", self.pub_endpoint),
            ("NODE_DATA_DIR", self.replay_endpoint),
        ):
            if endpoint.startswith("ipc://"):
                path = endpoint[len("ipc://") :]
                if len(path.encode()) > _IPC_PATH_MAX:
                    raise ConfigError(
                        var,
                        str(self.data_dir),
                        f"the ipc:// socket path {path!r} would exceed {_IPC_PATH_MAX} bytes;"
                        " use a shorter data directory or set the NODE_*_BIND endpoints",
                    )
        self._check_curve()
        ports = {
            "NODE_WEB_PORT": self.web_port,
            "NODE_FANOUT_PORT": self.fanout_port,
            "NODE_METRICS_PORT_MONITOR": self.metrics_port_monitor,
            "NODE_METRICS_PORT_ROUTER": self.metrics_port_router,
            "NODE_METRICS_PORT_PUBLISHER": self.metrics_port_publisher,
            "NODE_METRICS_PORT_STORE": self.metrics_port_store,
            "NODE_METRICS_PORT_POSTGRES": self.metrics_port_postgres,
            "NODE_METRICS_PORT_VICTORIA": self.metrics_port_victoria,
            "NODE_METRICS_PORT_LAKE": self.metrics_port_lake,
        }
        seen: dict[int, str] = {}
        for var, port in ports.items():
            if port in seen:
                raise ConfigError(var, str(port), f"port already used by {seen[port]}")
            seen[port] = var

    def _check_curve(self) -> None:
        """A tcp:// link never runs open by accident (docs/monitor-router.md)."""
        if not self.curve:
            return
        if self.router_bind_endpoint.startswith("tcp://") and self.curve_clients_dir is None:
            raise ConfigError(
                "NODE_CURVE_CLIENTS_DIR",
                "<unset>",
                f"NODE_ROUTER_BIND={self.router_bind_endpoint} is tcp://: set NODE_CURVE_CLIENTS_DIR to a"
                " directory holding the monitors' public keys (their curve_client.key files), or"
                " NODE_CURVE=off to run the link unauthenticated (isolated lab networks only)",
            )
        if (
            self.router_connect is not None
            and self.router_connect.startswith("tcp://")
            and not self.curve_server_key
        ):
            raise ConfigError(
                "NODE_CURVE_SERVER_KEY",
                "<unset>",
                f"NODE_ROUTER_CONNECT={self.router_connect} is tcp://: set NODE_CURVE_SERVER_KEY to the"
                " router's public key (its NODE_DATA_DIR/curve_server.key file, or the Z85 text in it),"
                " or NODE_CURVE=off on both sides (isolated lab networks only)",
            )
        # The publisher's sockets: CURVE on every tcp:// bind, loopback included (an
        # unauthenticated local process must not read the stream nor CONFIRM for the
        # store).  The node's own store/fanout (same data dir) are always accepted; any
        # other subscriber only when its key is listed, so a bind other nodes can reach
        # needs the list.
        for var, endpoint in (("NODE_PUB_BIND", self.pub_bind), ("NODE_REPLAY_BIND", self.replay_bind)):
            if (
                endpoint is not None
                and endpoint.startswith("tcp://")
                and not _is_loopback_tcp(endpoint)
                and self.curve_subscribers_dir is None
            ):
                raise ConfigError(
                    "NODE_CURVE_SUBSCRIBERS_DIR",
                    "<unset>",
                    f"{var}={endpoint} is a tcp:// bind other hosts can reach: set NODE_CURVE_SUBSCRIBERS_DIR"
                    " to a directory holding the stores' and fanouts' public keys (their curve_client.key"
                    " files), or NODE_CURVE=off to run it unauthenticated (isolated lab networks only)",
                )
        for var, endpoint in (
            ("NODE_PUB_CONNECT", self.pub_connect),
            ("NODE_REPLAY_CONNECT", self.replay_connect),
        ):
            if endpoint is not None and endpoint.startswith("tcp://") and not self.curve_publisher_key:
                raise ConfigError(
                    "NODE_CURVE_PUBLISHER_KEY",
                    "<unset>",
                    f"{var}={endpoint} is tcp://: set NODE_CURVE_PUBLISHER_KEY to the publisher's public"
                    " key (its NODE_DATA_DIR/curve_server.key file, or the Z85 text in it), or NODE_CURVE=off"
                    " on both sides (isolated lab networks only)",
                )


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the configuration once; on a bad value print why and exit with status 2."""
    try:
        return Settings.from_env(environ)
    except ConfigError as exc:
        print(f"iotnode: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
