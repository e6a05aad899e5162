"""Wire formats the generator speaks, free of I/O.

* device protocol v1 (DESIGN.md contract 3): messages, acks, tokens;
* MQTT 3.1.1, just enough for a QoS 1 publisher: CONNECT, PUBLISH, PINGREQ out;
  CONNACK, PUBACK in (used to drive Mosquitto at the same load).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import jwt
import msgpack
from jwt.warnings import InsecureKeyLengthWarning

ENCODINGS = ("msgpack", "json")


class BenchError(Exception):
    """Root of the harness's errors: bad arguments, a target that cannot start."""


# ----------------------------------------------------------------------------- tokens
def device_token(secret: str, device_id: str, ttl: float | None = 24 * 3600) -> str:
    claims: dict[str, Any] = {"sub": device_id}
    if ttl is not None:
        claims["exp"] = int(time.time() + ttl)
    with warnings.catch_warnings():
        # The key is the node's (>= 16 chars by its configuration); not ours to judge here.
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(claims, secret, algorithm="HS256")


def read_secret(secret: str | None, data_dir: Path | None) -> str:
    """The HS256 key: given on the command line, or the node's ``DATA_DIR/jwt_secret``."""
    if secret:
        return secret
    if data_dir is None:
        raise BenchError("no JWT secret: pass --secret or --data-dir (the node's NODE_DATA_DIR)")
    path = Path(data_dir) / "jwt_secret"
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise BenchError(f"cannot read the node's JWT secret at {str(path)!r}: {exc.strerror}") from None
    if not value:
        raise BenchError(f"the JWT secret file {str(path)!r} is empty")
    return value


# ----------------------------------------------------------------------- device protocol
def make_data(payload_bytes: int) -> str:
    """The ``data`` value: a string that makes the encoded message about ``payload_bytes`` long."""
    if payload_bytes < 0:
        raise BenchError(f"payload size must be >= 0 bytes, got {payload_bytes}")
    return "x" * max(0, payload_bytes - 40)


def encode_message(encoding: str, seq: int, ts: float, data: Any) -> bytes:
    if encoding == "msgpack":
        return msgpack.packb({"seq": seq, "ts": ts, "data": data})  # type: ignore[no-any-return]
    return json.dumps({"seq": seq, "ts": ts, "data": data}, separators=(",", ":")).encode()


class Reply:
    """A decoded node → device frame: an ack (``ack`` set) or an error."""

    __slots__ = ("ack", "error", "seq")

    def __init__(self, ack: int | None, error: str | None, seq: int | None) -> None:
        self.ack = ack
        self.error = error
        self.seq = seq

    def __repr__(self) -> str:
        return f"Reply(ack={self.ack!r}, error={self.error!r}, seq={self.seq!r})"


def decode_reply(payload: bytes, binary: bool) -> Reply:
    """Parse ``{"ack": N}`` or ``{"error": reason, "seq": N|null}``; anything else → error reply."""
    try:
        obj = msgpack.unpackb(payload) if binary else json.loads(payload)
    except Exception:  # noqa: BLE001 - any undecodable frame is reported, with its bytes
        return Reply(None, f"undecodable reply {bytes(payload[:80])!r}", None)
    if isinstance(obj, dict):
        ack = obj.get("ack")
        if isinstance(ack, int) and not isinstance(ack, bool):
            return Reply(ack, None, None)
        if "error" in obj:
            seq = obj.get("seq")
            return Reply(None, str(obj["error"]), seq if isinstance(seq, int) else None)
    return Reply(None, f"unexpected reply {obj!r:.80}", None)


# ------------------------------------------------------------------------------- MQTT
MQTT_CONNACK = 2
MQTT_PUBACK = 4
MQTT_PINGRESP = 13


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _mqtt_str(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


def mqtt_connect(client_id: str, keepalive: int = 60, clean_session: bool = True) -> bytes:
    body = _mqtt_str(b"MQTT") + bytes([4, 0x02 if clean_session else 0x00]) + keepalive.to_bytes(2, "big")
    body += _mqtt_str(client_id.encode())
    return b"\x10" + _remaining_length(len(body)) + body


def mqtt_publish_qos1(topic: bytes, packet_id: int, payload: bytes) -> bytes:
    if not 1 <= packet_id <= 0xFFFF:
        raise BenchError(f"MQTT packet id must be within 1..65535, got {packet_id}")
    body_len = 2 + len(topic) + 2 + len(payload)
    return b"\x32" + _remaining_length(body_len) + _mqtt_str(topic) + packet_id.to_bytes(2, "big") + payload


def mqtt_pingreq() -> bytes:
    return b"\xc0\x00"


class MqttParser:
    """Splits a byte stream (WebSocket frames may cut or join packets) into packets."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            ptype = buf[pos] >> 4
            length = 0
            mult = 1
            i = pos + 1
            complete = False
            while i < end and i - pos <= 4:
                byte = buf[i]
                length += (byte & 0x7F) * mult
                mult <<= 7
                i += 1
                if not byte & 0x80:
                    complete = True
                    break
            if not complete:
                if i - pos > 4:
                    raise BenchError(f"MQTT: malformed remaining length {bytes(buf[pos:i])!r}")
                break  # length bytes not all here yet
            if end - i < length:
                break
            out.append((ptype, bytes(buf[i : i + length])))
            pos = i + length
        del buf[:pos]
        return out
