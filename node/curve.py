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
key's :func:`fingerprint` at most.  ``ipc://`` endpoints are left alone: inside
one node the data directory's file permissions protect them.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
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
    "secure_client",
    "secure_server",
]

SERVER: Final = "server"
CLIENT: Final = "client"
ZAP_DOMAIN: Final = b"iotnode"
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
        self, directory: Path | None, fixed: dict[bytes, str], log: logging.Logger, stage: str
    ) -> None:
        self.directory = directory
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
                    "refused a CURVE client whose public key (fingerprint %s) is not in "
                    "NODE_CURVE_CLIENTS_DIR=%s",
                    fingerprint(key),
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
    """Make ``sock`` (not yet bound) a CURVE server when ``endpoint`` is ``tcp://`` and CURVE is on.

    Starts a ZAP authenticator on ``ctx`` accepting the keys of
    ``NODE_CURVE_CLIENTS_DIR`` and this data directory's client key.  Returns
    ``None`` for ``ipc://`` (or ``NODE_CURVE=off``, logged as a warning).  A malformed
    key file in the clients directory raises :class:`ConfigError`; an empty one is
    a warning (nobody else gets in until a key is added).
    """
    if not is_tcp(endpoint):
        return None
    if not settings.curve:
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
    directory = settings.curve_clients_dir
    try:
        pair = load_keypair(settings.data_path, SERVER)
        local = load_keypair(settings.data_path, CLIENT)
    except KeyFileError as exc:
        raise ConfigError("NODE_DATA_DIR", str(settings.data_dir), str(exc)) from None
    allow = AllowList(directory, {local.public: "this node"}, log, stage)
    try:
        count = allow.load(strict=True)
    except KeyFileError as exc:
        raise ConfigError("NODE_CURVE_CLIENTS_DIR", str(directory), str(exc)) from None
    if count == 0:
        log.warning(
            "NODE_CURVE_CLIENTS_DIR=%s holds no *.key file yet: every other node's monitor is refused until"
            " its curve_client.key is copied there (read again on change, no restart needed)",
            directory,
        )
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx, log=logging.getLogger("node.curve.zap"))
    auth.start()
    # the domain must be the socket's ZAP domain: "*" would only cover sockets without one
    auth.configure_curve_callback(ZAP_DOMAIN.decode("ascii"), credentials_provider=allow)
    sock.zap_domain = ZAP_DOMAIN
    sock.curve_secretkey = pair.secret
    sock.curve_publickey = pair.public
    sock.curve_server = True
    log.info(
        "CURVE on %s: server key fingerprint %s (give %s to the clients); %d authorized client keys in %s"
        " + this node's own client key",
        endpoint,
        pair.fingerprint,
        pair.public_path,
        count,
        directory,
    )
    return ServerLink(auth, pair, allow)


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
