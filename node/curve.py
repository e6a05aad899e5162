"""ZeroMQ CURVE for the ``tcp://`` links of the pipeline: key files, loading, the ZAP allow-list.

A ``tcp://`` endpoint can be reached by anyone on the network, so with
``NODE_CURVE=on`` (the default) every ``tcp://`` link is encrypted and both ends
authenticate (docs/monitor-router.md, "Several nodes over tcp://"):

* the **server** (the router's ROUTER on ``NODE_ROUTER_BIND``) has a long-term
  keypair in ``NODE_DATA_DIR``: ``curve_server.key_secret`` (mode 0600) and
  ``curve_server.key`` (the public key, for the operator to copy to the clients);
* each **client** (a monitor) has its own keypair, ``curve_client.key_secret`` /
  ``curve_client.key``, and knows the server's public key from
  ``NODE_CURVE_SERVER_KEY`` (Z85 text or a key file);
* the server accepts only the client public keys found in
  ``NODE_CURVE_CLIENTS_DIR`` (``*.key`` files, pyzmq/czmq certificate format),
  plus the client key of its own data directory (a monitor of the same node is
  as trusted as the ``ipc://`` socket it would otherwise use).  The directory is
  read again when its ``*.key`` files change: a new front node is authorised
  without restarting the router.

Key files use the certificate format of :mod:`zmq.auth` (``public-key = "..."``
lines), so a ``.key`` file can be dropped into another node's clients directory
as it is.  Keypairs are generated on first use, race-free between processes
starting together (a private temporary file hard-linked into place, as
``node.auth`` does for ``jwt_secret``).

Secret keys are never logged or put into exception messages; logs show a public
key's :func:`fingerprint` at most.

The publisher's XPUB and replay ROUTER are CURVE servers the same way, behind one
ZAP authenticator (:func:`secure_servers`), on **every** ``tcp://`` bind, loopback
included: its clients are the stores and fanouts, whose keys are listed in
``NODE_CURVE_SUBSCRIBERS_DIR`` (plus this data directory's own client key), and
they know its key from ``NODE_CURVE_PUBLISHER_KEY``.  A refused client connects
again by itself (:class:`Reconnector`; libzmq would not).

``ipc://`` endpoints carry no CURVE: they are bound with the umask cleared
(:func:`bind`, socket file mode 0700), so only this user can connect to them.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import zmq

from node.errors import ConfigError
from node.keyfile import (
    KeyFileError,
    certificate,
    fingerprint,
    parse_certificate,
    parse_public_key,
    read_public_key,
    resolve_server_key,
)
from node.privatefile import create_once

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

    from node.config import Settings

__all__ = [
    "CLIENT",
    "SERVER",
    "AllowList",
    "KeyFileError",
    "Keypair",
    "ServerLink",
    "fingerprint",
    "is_tcp",
    "key_paths",
    "load_keypair",
    "parse_public_key",
    "read_public_key",
    "resolve_server_key",
    "Reconnector",
    "bind",
    "client_hint",
    "secure_client",
    "secure_server",
    "secure_servers",
]

SERVER: Final = "server"
CLIENT: Final = "client"
ZAP_DOMAIN: Final = b"iotnode"
# ZMTP heartbeats of the publisher's links (the monitor has its own, same values): a peer
# silent this long behind a cut link or a dead host is dropped and reconnected.
HEARTBEAT_IVL_MS: Final = 2000
HEARTBEAT_TIMEOUT_MS: Final = 6000
_MAX_REFUSED_LOGGED: Final = 1024  # distinct refused keys remembered (each is logged once)


@dataclass(frozen=True)
class Keypair:
    """A long-term CURVE keypair of this node (Z85 bytes) and the file of its public key."""

    public: bytes
    secret: bytes = field(repr=False)
    public_path: Path

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)


# --------------------------------------------------------------------- key files
def key_paths(data_path: Path, role: str) -> tuple[Path, Path]:
    """``(public key file, secret key file)`` of this node's ``role`` keypair."""
    if role not in (SERVER, CLIENT):
        raise ValueError(f"role must be {SERVER!r} or {CLIENT!r}, got {role!r}")
    return data_path / f"curve_{role}.key", data_path / f"curve_{role}.key_secret"


def _read_keypair(public_path: Path, secret_path: Path) -> Keypair:
    try:
        info = secret_path.stat()
        text = secret_path.read_bytes()
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise KeyFileError(f"cannot read {secret_path}: {exc.strerror or exc}") from None
    if info.st_mode & 0o077:
        raise KeyFileError(
            f"{secret_path} is accessible by others (mode {stat.S_IMODE(info.st_mode):04o});"
            f" run: chmod 600 {secret_path}"
        )
    public, secret = parse_certificate(text, secret_path)
    if secret is None:
        raise KeyFileError(f"{secret_path} holds no secret-key line; delete it to generate a new keypair")
    if zmq.curve_public(secret) != public:
        raise KeyFileError(
            f"{secret_path}: its public-key does not match its secret-key; delete it to regenerate"
        )
    return Keypair(public, secret, public_path)


def load_keypair(data_path: Path, role: str) -> Keypair:
    """This node's ``role`` keypair, generated on first use.

    The secret key file (public and secret key, mode 0600) is created by hard-linking
    a private temporary file into place, so processes starting together agree on one
    keypair; the public key file next to it is (re)written from it when missing or
    different.  A secret key file readable by group or others is refused.
    """
    public_path, secret_path = key_paths(data_path, role)
    try:
        pair = _read_keypair(public_path, secret_path)
    except FileNotFoundError:
        public, secret = zmq.curve_keypair()
        try:
            data_path.mkdir(parents=True, exist_ok=True)
            create_once(secret_path, certificate(public, secret), 0o600)  # or use the winner's
        except OSError as exc:
            raise KeyFileError(f"cannot create {secret_path}: {exc.strerror or exc}") from None
        pair = _read_keypair(public_path, secret_path)
    try:
        current = read_public_key(public_path)
    except KeyFileError:
        current = None
    if current != pair.public:
        tmp = public_path.with_name(f".{public_path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            tmp.write_bytes(certificate(pair.public, None))
            os.chmod(tmp, 0o644)
            os.replace(tmp, public_path)  # same content whoever writes it
        except OSError as exc:
            raise KeyFileError(f"cannot write {public_path}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
    return pair


# --------------------------------------------------------------------- the allow-list
class AllowList:
    """The client public keys a CURVE server accepts: ``*.key`` files of a directory plus fixed keys.

    Used as a :meth:`zmq.auth.Authenticator.configure_curve_callback` credentials
    provider (``callback`` runs in the authenticator's thread, once per handshake).
    The directory is read again when the names, sizes or times of its ``*.key``
    files change; a file that cannot be read then is skipped with a warning (at
    start, :meth:`load` raises instead).
    """

    def __init__(
        self,
        directory: Path | None,
        fixed: dict[bytes, str],
        log: logging.Logger,
        stage: str,
        variable: str = "NODE_CURVE_CLIENTS_DIR",
    ) -> None:
        self.directory = directory
        self.variable = variable
        self.fixed = dict(fixed)
        self.log = log
        self.stage = stage
        self._lock = threading.Lock()
        self._keys: dict[bytes, str] = {}
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._refused: set[bytes] = set()

    def _files(self) -> list[Path]:
        if self.directory is None:
            return []
        return sorted(p for p in self.directory.glob("*.key") if p.is_file())

    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        for p in self._files():
            try:
                info = p.stat()
            except OSError:
                continue
            out.append((p.name, info.st_mtime_ns, info.st_size))
        return tuple(out)

    def load(self, strict: bool = True) -> int:
        """(Re)read the directory; return how many keys it holds.  ``strict``: a bad file raises."""
        keys: dict[bytes, str] = {}
        signature = self._scan()
        for path in self._files():
            try:
                keys[read_public_key(path)] = path.name
            except KeyFileError as exc:
                if strict:
                    raise
                self.log.warning("skipping an unusable authorized key file: %s", exc)
        with self._lock:
            self._keys = keys
            self._signature = signature
        return len(keys)

    def allows(self, key: bytes) -> bool:
        if key in self.fixed:
            return True
        if self.directory is not None and self._scan() != self._signature:
            count = self.load(strict=False)
            self.log.info("authorized client keys reloaded from %s: %d keys", self.directory, count)
        with self._lock:
            return key in self._keys

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = self.allows(key)
        if not allowed:
            from node.metrics import ERRORS

            ERRORS.labels(stage=self.stage, reason="curve_auth").inc()
            if key not in self._refused and len(self._refused) < _MAX_REFUSED_LOGGED:
                self._refused.add(key)
                self.log.warning(
                    "refused a CURVE client whose public key (fingerprint %s) is not in %s=%s",
                    fingerprint(key),
                    self.variable,
                    self.directory,
                )
        return allowed


# --------------------------------------------------------------------- sockets
def is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


@dataclass
class ServerLink:
    """A CURVE server socket's running authenticator (stop it before destroying the context)."""

    authenticator: ThreadAuthenticator
    keypair: Keypair
    allow: AllowList

    def stop(self) -> None:
        self.authenticator.stop()


def secure_server(
    ctx: zmq.Context[zmq.Socket[bytes]],
    sock: zmq.Socket[bytes],
    settings: Settings,
    endpoint: str,
    variable: str,
    stage: str,
    log: logging.Logger,
) -> ServerLink | None:
    """The router's ROUTER (not yet bound) as a CURVE server of ``NODE_CURVE_CLIENTS_DIR``'s keys."""
    return secure_servers(
        ctx,
        [(sock, endpoint, variable)],
        settings,
        stage,
        log,
        ("NODE_CURVE_CLIENTS_DIR", settings.curve_clients_dir),
        "monitor",
    )


def secure_servers(
    ctx: zmq.Context[zmq.Socket[bytes]],
    sockets: Sequence[tuple[zmq.Socket[bytes], str, str]],
    settings: Settings,
    stage: str,
    log: logging.Logger,
    clients: tuple[str, Path | None],
    who: str,
) -> ServerLink | None:
    """Make each ``(socket, endpoint, variable)`` (not yet bound) whose endpoint is ``tcp://`` a
    CURVE server, all behind **one** ZAP authenticator on ``ctx`` (libzmq allows one per context).

    The authenticator accepts the keys of the directory ``clients = (variable, path)``
    and this data directory's client key.  Returns ``None`` when no endpoint is
    ``tcp://`` (or ``NODE_CURVE=off``, logged as a warning per endpoint).  A malformed
    key file in the directory raises :class:`ConfigError`; an empty or unset one is a
    warning (nobody but this node's own clients gets in until a key is added).
    ``who`` names the expected clients in log lines ("monitor", "store or fanout").
    """
    tcp = [(sock, endpoint, variable) for sock, endpoint, variable in sockets if is_tcp(endpoint)]
    if not tcp:
        return None
    if not settings.curve:
        for _, endpoint, variable in tcp:
            log.warning(
                "NODE_CURVE=off: %s=%s is neither authenticated nor encrypted; anyone who can reach it can"
                " connect (use only on an isolated lab network)",
                variable,
                endpoint,
            )
        return None
    if not zmq.has("curve"):
        raise ConfigError(
            "NODE_CURVE", "on", "this libzmq has no CURVE support (install a pyzmq wheel with libsodium)"
        )
    clients_variable, directory = clients
    try:
        pair = load_keypair(settings.data_path, SERVER)
        local = load_keypair(settings.data_path, CLIENT)
    except KeyFileError as exc:
        raise ConfigError("NODE_DATA_DIR", str(settings.data_dir), str(exc)) from None
    allow = AllowList(directory, {local.public: "this node"}, log, stage, clients_variable)
    try:
        count = allow.load(strict=True)
    except KeyFileError as exc:
        raise ConfigError(clients_variable, str(directory), str(exc)) from None
    if count == 0:
        log.warning(
            "%s=%s holds no *.key file yet: every other node's %s is refused until its curve_client.key is"
            " copied there (read again on change, no restart needed)",
            clients_variable,
            directory,
            who,
        )
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx, log=logging.getLogger("node.curve.zap"))
    auth.start()
    # the domain must be the socket's ZAP domain: "*" would only cover sockets without one
    auth.configure_curve_callback(ZAP_DOMAIN.decode("ascii"), credentials_provider=allow)
    for sock, endpoint, _ in tcp:
        sock.zap_domain = ZAP_DOMAIN
        sock.curve_secretkey = pair.secret
        sock.curve_publickey = pair.public
        sock.curve_server = True
        log.info(
            "CURVE on %s: server key fingerprint %s (give %s to the %s nodes); %d authorized client keys"
            " in %s + this node's own client key",
            endpoint,
            pair.fingerprint,
            pair.public_path,
            who,
            count,
            directory,
        )
    return ServerLink(auth, pair, allow)


def bind(sock: zmq.Socket[bytes], endpoint: str) -> None:
    """Bind ``sock``; an ``ipc://`` socket file is created mode 0700 (owner only) whatever the umask.

    Connecting to a Unix socket needs write permission on its file: with the
    umask cleared while binding, no other user can connect to the node's ipc://
    links (the data directory's permissions are a second fence, not the only one).
    The umask is process-wide: call this while the stage sets up, before it
    starts threads that create files.
    """
    if not endpoint.startswith("ipc://"):
        sock.bind(endpoint)
        return
    old = os.umask(0o077)
    try:
        sock.bind(endpoint)
    finally:
        os.umask(old)


def reconnect(sock: zmq.Socket[bytes], endpoint: str) -> None:
    """Connect ``sock`` to ``endpoint`` again after a refused CURVE handshake (libzmq does
    not retry a handshake the server refused)."""
    try:
        sock.disconnect(endpoint)
    except zmq.ZMQError:
        pass  # the refused session is already gone
    sock.connect(endpoint)


class Reconnector:
    """Connect a CURVE client socket again after the server refused its handshake.

    libzmq never retries a connection whose handshake was refused (ZAP denial,
    mechanism mismatch): without this, a store or fanout started before its key was
    authorized would wait forever.  :meth:`poll` (non-blocking, call it every loop
    step, or when :attr:`events` is readable and at :attr:`retry_at`) reads the
    socket's handshake events, logs the first refusal with ``hint`` (what the
    operator must fix), counts each one in ``iotnode_errors{stage, reason="handshake"}``,
    and ``RETRY`` s after a refusal disconnects and connects the endpoint again;
    ``connected`` says whether a handshake succeeded and the connection has not
    dropped since (readiness), ``handshakes`` counts the successful ones (a stage
    resends what a restarted peer lost).  Works for ``zmq.asyncio`` sockets too (the
    events are read through a plain socket on the same context).
    """

    RETRY: Final = 2.0  # s between connection attempts while refused
    EVENTS: Final = (
        zmq.EVENT_HANDSHAKE_SUCCEEDED
        | zmq.EVENT_DISCONNECTED
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    )
    _FAILED: Final = (
        zmq.EVENT_HANDSHAKE_FAILED_AUTH
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    )

    def __init__(
        self, sock: zmq.Socket[bytes], endpoint: str, peer: str, hint: str, stage: str, log: logging.Logger
    ) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.peer = peer
        self.hint = hint
        self.stage = stage
        self.log = log
        address = f"inproc://iotnode-handshakes-{id(self):x}"
        sock.monitor(address, self.EVENTS)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(sock.context.underlying)
        self.events: zmq.Socket[bytes] = self._ctx.socket(zmq.PAIR)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.connect(address)
        self.refused = False
        self.connected = False  # a handshake succeeded and the connection has not dropped since
        self.handshakes = 0  # handshakes that succeeded so far: a change means a (re)connection
        self.retry_at: float | None = None

    def poll(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(self.events, zmq.NOBLOCK)
            except zmq.Again:
                break
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self.refused:
                    self.log.info("the %s at %s accepted the handshake", self.peer, self.endpoint)
                self.refused = False
                self.connected = True
                self.handshakes += 1
                continue
            if kind == zmq.EVENT_DISCONNECTED:
                self.connected = False
                continue
            if not kind & self._FAILED:
                continue
            from node.metrics import ERRORS

            ERRORS.labels(stage=self.stage, reason="handshake").inc()
            if kind != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # libzmq retries that one itself
                self.retry_at = time.monotonic() + self.RETRY
            if not self.refused:
                self.refused = True
                self.log.error(
                    "the %s at %s refused the connection handshake (%s): %s; retrying every %gs",
                    self.peer,
                    self.endpoint,
                    zmq.Event(kind).name,
                    self.hint,
                    self.RETRY,
                )
        if self.retry_at is not None and time.monotonic() >= self.retry_at:
            self.retry_at = None
            reconnect(self.sock, self.endpoint)

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.events.close(linger=0)


def client_hint(keypair: Keypair | None, server_list: str, server_key: str) -> str:
    """What an operator must fix when a CURVE server refuses this client."""
    if keypair is None:
        return "is the server using CURVE (NODE_CURVE must be the same on both sides)?"
    return (
        f"the server must list this node's public key {keypair.public_path} (fingerprint"
        f" {keypair.fingerprint}) in its {server_list}, and {server_key} must be the server's"
        " curve_server.key"
    )


def secure_client(
    sock: zmq.Socket[bytes],
    settings: Settings,
    endpoint: str,
    server_key: bytes | None,
    variable: str,
    log: logging.Logger,
) -> Keypair | None:
    """Make ``sock`` (not yet connected) a CURVE client of ``server_key`` when ``endpoint`` is ``tcp://``.

    ``server_key`` None: the server is this node's own (its key file in the data
    directory).  Returns this node's client keypair, or ``None`` when no CURVE is used.
    """
    if not is_tcp(endpoint):
        return None
    if not settings.curve:
        log.warning(
            "NODE_CURVE=off: the link to %s=%s is neither authenticated nor encrypted (lab use only)",
            variable,
            endpoint,
        )
        return None
    try:
        pair = load_keypair(settings.data_path, CLIENT)
        if server_key is None:
            server_key = load_keypair(settings.data_path, SERVER).public
    except KeyFileError as exc:
        raise ConfigError("NODE_DATA_DIR", str(settings.data_dir), str(exc)) from None
    sock.curve_secretkey = pair.secret
    sock.curve_publickey = pair.public
    sock.curve_serverkey = server_key
    log.info(
        "CURVE on %s: this client's key fingerprint %s (the server must list %s), server key fingerprint %s",
        endpoint,
        pair.fingerprint,
        pair.public_path,
        fingerprint(server_key),
    )
    return pair


def main(argv: list[str] | None = None) -> int:
    """``python -m node.curve server|client``: make sure this node's keypair exists; print its public key.

    Prints the public key file to copy to the other side of the link, and its Z85
    text (usable as ``NODE_CURVE_SERVER_KEY``).  The secret key stays in
    ``NODE_DATA_DIR`` (mode 0600) and is never printed.
    """
    import sys

    from node.config import load_settings

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in (SERVER, CLIENT):
        print("usage: python -m node.curve server|client   (keys in NODE_DATA_DIR)", file=sys.stderr)
        return 2
    settings = load_settings()
    try:
        pair = load_keypair(settings.data_path, args[0])
    except KeyFileError as exc:
        print(f"iotnode: {exc}", file=sys.stderr)
        return 2
    print(f"public key file: {pair.public_path}")
    print(f"public key: {pair.public.decode('ascii')}")
    print(f"fingerprint: {pair.fingerprint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
