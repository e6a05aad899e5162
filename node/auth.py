"""Device and client-app tokens: HS256 JWTs, and the node's shared secret.

Public API (stable; the front, the fanout and the client library depend on it)
------------------------------------------------------------------------------

::

    load_secret(settings) -> str
        NODE_JWT_SECRET if set, else NODE_DATA_DIR/jwt_secret, generated on first
        use (mode 0600, race-free between processes starting together).
    issue_device_token(secret, device_id, ttl=None) -> str      claims: sub[, iat, exp]
    issue_client_token(secret, devices, ttl=None, subject="client") -> str
                                                            claims: sub, devices[, iat, exp]
    verify_device_token(secret, token, policy=None) -> device_id (str)
    verify_device_claims(secret, token, policy=None) -> DeviceGrant(device_id, exp, iat)
    verify_client_token(secret, token, policy=None) -> frozenset[str]   allowed device ids;
                                                            "*" in it means every device
    TokenPolicy.from_settings(settings)      NODE_JWT_REQUIRE_EXP, NODE_JWT_MAX_TTL,
                                              NODE_JWT_DENYLIST (a Denylist)
    token_expiry(token) -> float | None      exp of a token already verified
    client_allows(allowed, device_id) -> bool
    check_device_id(device_id) -> str                       raises ValueError naming the problem
    token_from_request(headers, query) -> str | None        Bearer header, else ?token=

Token lifetime (docs/security.md): ``exp`` is honoured when present (contract 3);
with ``NODE_JWT_REQUIRE_EXP=on`` a token without ``exp`` is refused, with
``NODE_JWT_MAX_TTL=S`` also one whose ``exp`` is more than S seconds away.  The
deny-list file (``NODE_JWT_DENYLIST``) revokes by subject: a line ``SUBJECT``
refuses every token of it, ``SUBJECT UNIX_TIME`` those issued (``iat``) before that
time (or without ``iat``); ``#`` starts a comment.  It is re-read when it changes
(checked at most once a second); a malformed new version is logged and the previous
one kept.  Refusals by policy are 401.

Refusals raise :class:`node.errors.AuthError` with ``reason`` (safe to show: never
the token) and ``status``: 401 for a missing, malformed, badly signed or expired
token; 403 for a genuine token that does not grant what is asked (a client token
at the device endpoint, a device token or an empty ``devices`` claim at the
client endpoint, an unusable device id).

Device ids (:func:`check_device_id`, docs/security.md): a non-empty ``str`` of at
most :data:`MAX_DEVICE_ID_BYTES` UTF-8 bytes (the NUL-terminated id is the ZeroMQ
topic downstream) of printable characters: no whitespace or separators (Unicode
``Z*``), no control, format (bidi overrides and isolates, zero-width characters),
surrogate, private-use or unassigned code points (Unicode ``C*``); ``*`` alone is
reserved (the "every device" claim of client tokens).

Key length: at least :data:`node.config.MIN_SECRET_BYTES` (32) bytes, the HS256
minimum of RFC 7518 (PyJWT warns below it): a configured ``NODE_JWT_SECRET`` is
checked by ``node.config``, the ``jwt_secret`` file here (generated ones hold 43
characters, 256 bits); the file must not be readable by group or others.

Secrets and tokens are never logged or put into exception messages.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
import time
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import jwt

from node.config import MIN_SECRET_BYTES, Settings
from node.errors import AuthError, NodeError
from node.privatefile import create_once

__all__ = [
    "ALL_DEVICES",
    "DEFAULT_CLI_TTL",
    "DeviceGrant",
    "Denylist",
    "MAX_DEVICE_ID_BYTES",
    "TokenPolicy",
    "check_device_id",
    "client_allows",
    "issue_client_token",
    "issue_device_token",
    "load_secret",
    "token_expiry",
    "token_from_request",
    "verify_client_token",
    "verify_device_claims",
    "verify_device_token",
]

log = logging.getLogger("iotnode.auth")

MAX_DEVICE_ID_BYTES: Final = 256
ALL_DEVICES: Final = "*"
_ALGORITHM: Final = "HS256"
_SECRET_BYTES: Final = 32  # -> 43 url-safe characters
#: Lifetime of a token printed by ``python -m node token`` unless told otherwise.
DEFAULT_CLI_TTL: Final = 365 * 24 * 3600


class SecretError(NodeError):
    """The secret file exists but cannot be used (too short, unreadable, readable by others)."""


# ------------------------------------------------------------------- device ids
def check_device_id(device_id: object) -> str:
    """Return ``device_id`` if usable, else raise ``ValueError`` saying why."""
    if not isinstance(device_id, str):
        raise ValueError(f"device id must be a string, got {type(device_id).__name__}")
    if not device_id:
        raise ValueError("device id must not be empty")
    if "\0" in device_id:
        raise ValueError("device id must not contain NUL")
    try:
        size = len(device_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("device id must be valid Unicode (no lone surrogates)") from None
    if size > MAX_DEVICE_ID_BYTES:
        raise ValueError(f"device id is {size} UTF-8 bytes, the limit is {MAX_DEVICE_ID_BYTES}")
    if device_id == ALL_DEVICES:
        raise ValueError("device id '*' is reserved (it means every device in client tokens)")
    if not device_id.isascii() or not device_id.isprintable() or " " in device_id:
        for position, char in enumerate(device_id):
            category = unicodedata.category(char)
            if category[0] in "CZ":  # control, format, surrogate, private, unassigned; spaces
                raise ValueError(
                    f"device id must not contain U+{ord(char):04X} ({_CATEGORY.get(category, category)})"
                    f" at character {position}"
                )
    return device_id


_CATEGORY = {
    "Cc": "a control character",
    "Cf": "a format character: bidi control or zero-width",
    "Co": "a private-use character",
    "Cn": "an unassigned code point",
    "Zs": "whitespace",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}


# ----------------------------------------------------------------------- tokens
def _encode(secret: str, claims: dict[str, Any]) -> str:
    return jwt.encode(claims, secret, algorithm=_ALGORITHM)


def _decode(secret: str, token: str | None, required: list[str]) -> dict[str, Any]:
    if not token:
        raise AuthError("missing token: send 'Authorization: Bearer <jwt>' or '?token=<jwt>'", 401)
    try:
        return jwt.decode(token, secret, algorithms=[_ALGORITHM], options={"require": required})
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired", 401) from None
    except jwt.ImmatureSignatureError:
        raise AuthError("token not yet valid (nbf/iat in the future)", 401) from None
    except jwt.InvalidSignatureError:
        raise AuthError("token signature does not verify", 401) from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(f"token lacks the {exc.claim!r} claim", 401) from None
    except jwt.InvalidAlgorithmError:
        raise AuthError(f"token algorithm is not {_ALGORITHM}", 401) from None
    except jwt.DecodeError:
        raise AuthError("malformed token", 401) from None
    except jwt.InvalidTokenError as exc:  # InvalidSubject, bad exp type, ...
        raise AuthError(f"invalid token ({type(exc).__name__})", 401) from None


def _times(ttl: float | None) -> dict[str, int]:
    if ttl is None:
        return {}
    if not ttl > 0:
        raise ValueError(f"ttl must be > 0 seconds, got {ttl!r}")
    now = int(time.time())
    return {"iat": now, "exp": now + max(1, int(round(ttl)))}


def issue_device_token(secret: str, device_id: str, ttl: float | None = None) -> str:
    """A device token (``sub`` = device id); without ``ttl`` it does not expire."""
    return _encode(secret, {"sub": check_device_id(device_id), **_times(ttl)})


def issue_client_token(
    secret: str, devices: Iterable[str], ttl: float | None = None, subject: str = "client"
) -> str:
    """A client-app token whose ``devices`` claim lists ids (or ``["*"]``)."""
    ids = list(devices)
    if not ids:
        raise ValueError("a client token needs at least one device id (or '*')")
    for device_id in ids:
        if device_id != ALL_DEVICES:
            check_device_id(device_id)
    return _encode(secret, {"sub": subject, "devices": ids, **_times(ttl)})


# ----------------------------------------------------------------------- policy
class Denylist:
    """The revoked subjects of ``NODE_JWT_DENYLIST``, re-read when the file changes."""

    CHECK_EVERY = 1.0  # seconds between two stat() calls of the file

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self._entries: dict[str, float] = {}  # subject -> not-before (inf: always refused)
        self.version = 0  # +1 at each reload that changed the entries
        self._reload(strict=True)

    @staticmethod
    def parse(text: str, path: Path) -> dict[str, float]:
        entries: dict[str, float] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) > 2:
                raise ValueError(f"{path}:{number}: expected 'SUBJECT [UNIX_TIME]', got {line[:60]!r}")
            not_before = float("inf")
            if len(parts) == 2:
                try:
                    not_before = float(parts[1])
                except ValueError:
                    raise ValueError(f"{path}:{number}: {parts[1][:30]!r} is not a unix time") from None
            entries[parts[0]] = max(not_before, entries.get(parts[0], float("-inf")))
        return entries

    def _reload(self, strict: bool = False) -> None:
        try:
            info = self.path.stat()
            signature = (info.st_ino, info.st_mtime_ns, info.st_size)
            if signature == self._signature:
                return
            entries = self.parse(self.path.read_text(encoding="utf-8"), self.path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            if strict:
                raise NodeError(f"NODE_JWT_DENYLIST: {exc}") from None
            log.error("deny-list not reloaded, the previous one stays in force: %s", exc)
            self._signature = None  # try again at the next check
            return
        self._signature, self._entries = signature, entries
        self.version += 1
        log.info("deny-list %s: %d subject(s)", self.path, len(entries))

    def check(self) -> int:
        """Re-read the file if it changed (at most once per CHECK_EVERY); the version."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= self.CHECK_EVERY:
                self._checked = now
                self._reload()
            return self.version

    def refuses(self, subject: object, issued_at: object) -> bool:
        self.check()
        with self._lock:
            not_before = self._entries.get(subject) if isinstance(subject, str) else None
        if not_before is None:
            return False
        if isinstance(issued_at, bool) or not isinstance(issued_at, (int, float)):
            return True  # no usable iat: issued at an unknown time
        return issued_at < not_before


@dataclass(frozen=True)
class TokenPolicy:
    """What a node requires of a token beyond its signature (docs/security.md)."""

    require_exp: bool = False
    max_ttl: float | None = None
    denylist: Denylist | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenPolicy:
        denylist = Denylist(settings.jwt_denylist) if settings.jwt_denylist is not None else None
        return cls(settings.jwt_require_exp, settings.jwt_max_ttl, denylist)

    def check(self, claims: dict[str, Any]) -> None:
        exp = claims.get("exp")
        if exp is None:
            if self.require_exp or self.max_ttl is not None:
                raise AuthError("token has no exp: this node requires tokens that expire", 401)
        elif self.max_ttl is not None and exp - time.time() > self.max_ttl:
            raise AuthError(f"token lives longer than this node accepts ({self.max_ttl:g} s)", 401)
        if self.denylist is not None and self.denylist.refuses(claims.get("sub"), claims.get("iat")):
            raise AuthError("token revoked", 401)


def _expiry(claims: dict[str, Any]) -> float | None:
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def token_expiry(token: str | None) -> float | None:
    """The ``exp`` (unix s) of a token that was already verified, if it has one."""
    return _expiry(jwt.decode(token or "", options={"verify_signature": False}))


class DeviceGrant(NamedTuple):
    """What a valid device token grants: the device id, until when, issued when."""

    device_id: str
    exp: float | None
    iat: float | None


def verify_device_claims(secret: str, token: str | None, policy: TokenPolicy | None = None) -> DeviceGrant:
    """The :class:`DeviceGrant` of a valid device token, or :class:`AuthError`."""
    claims = _decode(secret, token, ["sub"])
    if "devices" in claims:
        raise AuthError("a client-app token cannot send device messages", 403)
    try:
        device_id = check_device_id(claims["sub"])
    except ValueError as exc:
        raise AuthError(f"unusable sub claim: {exc}", 403) from None
    if policy is not None:
        policy.check(claims)
    iat = claims.get("iat")
    issued = float(iat) if isinstance(iat, (int, float)) and not isinstance(iat, bool) else None
    return DeviceGrant(device_id, _expiry(claims), issued)


def verify_device_token(secret: str, token: str | None, policy: TokenPolicy | None = None) -> str:
    """The device id of a valid device token, or :class:`AuthError`."""
    return verify_device_claims(secret, token, policy)[0]


def verify_client_token(secret: str, token: str | None, policy: TokenPolicy | None = None) -> frozenset[str]:
    """The device ids a valid client token may follow (``"*"`` in it: all)."""
    claims = _decode(secret, token, [])
    if policy is not None:
        policy.check(claims)
    devices = claims.get("devices")
    if devices is None:
        raise AuthError("token has no 'devices' claim (a device token cannot follow devices)", 403)
    if not isinstance(devices, list) or not devices:
        raise AuthError("the 'devices' claim must be a non-empty list of device ids", 403)
    allowed: set[str] = set()
    for device_id in devices:
        if device_id == ALL_DEVICES:
            allowed.add(device_id)
            continue
        try:
            allowed.add(check_device_id(device_id))
        except ValueError as exc:
            raise AuthError(f"the 'devices' claim holds an unusable id: {exc}", 403) from None
    return frozenset(allowed)


def client_allows(allowed: frozenset[str], device_id: str) -> bool:
    return ALL_DEVICES in allowed or device_id in allowed


def token_from_request(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The JWT of a request: ``Authorization: Bearer <jwt>`` wins over ``?token=``.

    ``headers`` must be case-insensitive (Starlette's ``Headers``) or lower-case.
    """
    value = headers.get("authorization")
    if value:
        scheme, _, credentials = value.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
        return None  # a malformed Authorization header is not silently ignored
    return query.get("token") or None


# ----------------------------------------------------------------------- secret
def load_secret(settings: Settings) -> str:
    """The HS256 key every process of this node uses.

    ``NODE_JWT_SECRET`` if set.  Otherwise ``NODE_DATA_DIR/jwt_secret``: created on
    first use by writing a private temporary file (0600) and hard-linking it into
    place, so concurrent first starts agree on one secret and no reader ever sees a
    partial file; the loser of the race discards its candidate and reads the winner's.
    """
    if settings.jwt_secret:
        return settings.jwt_secret
    path = settings.jwt_secret_path
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    create_once(path, (secrets.token_urlsafe(_SECRET_BYTES) + "\n").encode("ascii"))  # or use the winner's
    return _read_secret(path)


def _read_secret(path: Path) -> str:
    with open(path, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        raw = fh.read()
    if mode & 0o077:
        raise SecretError(
            f"{path} is accessible by others (mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    try:
        value = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise SecretError(f"{path} is not ASCII text; delete it to regenerate") from None
    if len(value) < MIN_SECRET_BYTES:
        raise SecretError(
            f"{path} holds {len(value)} characters, expected at least {MIN_SECRET_BYTES};"
            " delete it to regenerate"
        )
    return value
