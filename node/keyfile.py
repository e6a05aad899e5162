"""CURVE key text and key files: Z85 keys and the zmq.auth certificate format.

Free of sockets: :mod:`node.config` reads ``NODE_CURVE_SERVER_KEY`` through
:func:`resolve_server_key`, and :mod:`node.curve` (keypairs, the ZAP allow-list,
securing sockets) builds on these.  A secret key is never echoed in an error.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final

from zmq.utils import z85

from node.errors import NodeError

KEY_CHARS: Final = 40  # a 32-byte Curve25519 key in Z85


class KeyFileError(NodeError, ValueError):
    """A CURVE key (text or file) is malformed, unreadable or not private enough."""


def fingerprint(public: bytes) -> str:
    """A short, loggable name of a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public).hexdigest()[:16]


def parse_public_key(text: str | bytes) -> bytes:
    """A Z85 CURVE key (40 characters) as bytes, or :class:`KeyFileError` saying why."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    key = raw.strip().strip(b"'\"")
    if len(key) != KEY_CHARS:
        raise KeyFileError(f"expected a {KEY_CHARS}-character Z85 key, got {len(key)} characters")
    try:
        decoded = z85.decode(key)
    except (ValueError, KeyError, TypeError, OverflowError):
        raise KeyFileError("not a Z85 key (characters outside the Z85 alphabet)") from None
    if len(decoded) != 32 or z85.encode(decoded) != key:
        raise KeyFileError("not a Z85 key (it does not decode to 32 bytes)")
    return key


def certificate(public: bytes, secret: bytes | None) -> bytes:
    """The text of a key file in the zmq.auth / czmq certificate format."""
    lines = [
        "#   iotnode ZeroMQ CURVE "
        + ("**secret** key: never copy or share this file" if secret else "public key"),
        "#   (zmq.auth certificate format; a public .key file may be given to the other side of the link)",
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode("ascii")}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return ("\n".join(lines) + "\n").encode("ascii")


def parse_certificate(text: bytes, path: Path) -> tuple[bytes, bytes | None]:
    """``(public, secret or None)`` of a certificate file's text; a bare Z85 key is a public key."""
    public: bytes | None = None
    secret: bytes | None = None
    meaningful = [
        line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(b"#")
    ]
    for line in meaningful:
        name, sep, value = line.partition(b"=")
        try:
            if sep and name.strip() == b"public-key":
                public = parse_public_key(value)
            elif sep and name.strip() == b"secret-key":
                secret = parse_public_key(value)  # same encoding rules
        except KeyFileError as exc:
            # never echo the value: it may be a secret key
            raise KeyFileError(f"{path}: {name.strip().decode('ascii', 'replace')}: {exc}") from None
    if public is None and len(meaningful) == 1:
        try:
            public = parse_public_key(meaningful[0])
        except KeyFileError as exc:
            raise KeyFileError(f"{path}: {exc}") from None
    if public is None:
        raise KeyFileError(f'{path}: no public-key = "..." line and not a bare Z85 key')
    return public, secret


def read_public_key(path: Path) -> bytes:
    """The public key in a key file (certificate or bare Z85 text)."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_certificate(text, path)[0]


def resolve_server_key(raw: str) -> bytes:
    """``NODE_CURVE_SERVER_KEY``: an existing key file's public key, else Z85 text."""
    value = raw.strip()
    path = Path(value)
    if path.is_file():
        return read_public_key(path)
    if path.exists():
        raise KeyFileError(f"{path} is not a regular file")
    try:
        return parse_public_key(value)
    except KeyFileError as exc:
        raise KeyFileError(f"neither a key file nor a Z85 public key: {exc}") from None
