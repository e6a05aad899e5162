"""Device protocol v1 (DESIGN.md contract 3), free of I/O.

One implementation of the wire format, shared by the node's front and the device
client library.  Nothing here touches a socket, a clock or a file: frames go in,
values or frames come out.

Public API (stable; other modules depend on it)
-----------------------------------------------

Device → node (what the front does with each frame)::

    parse_frame(frame: bytes | str) -> Message | ErrorReply
        bytes = a binary WebSocket frame holding a MessagePack map,
        str   = a text WebSocket frame holding a JSON object.
    Message(seq: int, ts: int | float | None, data: Any, binary: bool)
    ErrorReply(kind: str, reason: str, seq: int | None, binary: bool)
        .frame -> bytes | str     the encoded ``{"error": reason, "seq": seq}``
        .kind                     a short stable code for counting (see KINDS)
    reject(kind, reason, seq, binary) -> ErrorReply   for checks made outside
        this module (e.g. ``too_large`` when the record does not fit the ring)

Node → device::

    encode_ack(n: int, binary: bool) -> bytes | str         {"ack": n}
    encode_error(reason: str, seq: int | None, binary: bool) -> bytes | str

Client side (the device library)::

    encode_message(seq, data, ts=None, binary=True) -> bytes | str
        raises ProtocolError (a ValueError) if the message would be refused.
    decode_reply(frame: bytes | str) -> Ack | ErrorReply
        Ack(n: int, binary: bool); raises ProtocolError for a frame that is
        neither an ack nor an error reply.

Rules (contract 3, plus what the store needs)
---------------------------------------------

* ``seq``: required, an ``int`` (not ``bool``), ``0 <= seq <= 2**63 - 1`` (SQLite
  INTEGER is 64-bit signed).
* ``data``: required, any JSON-representable value: ``None``, ``bool``, ``str``,
  64-bit integers (``-2**63 <= i < 2**64``, the MessagePack range), finite floats,
  lists, maps with ``str`` keys, nested at most ``MAX_DEPTH`` levels.  Refused:
  MessagePack bin and ext values (including timestamps), non-string map keys,
  NaN/Infinity (also JSON's ``NaN``/``Infinity``/``1e999``), lone surrogates.
* ``ts``: optional; absent or ``null`` or a finite number (not ``bool``).
* Other keys are ignored (room for later protocol versions).

Every refusal is an :class:`ErrorReply` whose ``reason`` names the offending value or
type (``"seq must be a non-negative integer, got -3"``); exception text never
reaches a device.  :data:`KINDS` lists the ``kind`` codes.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from node.errors import NodeError

__all__ = [
    "Ack",
    "ErrorReply",
    "KINDS",
    "MAX_DEPTH",
    "MAX_SEQ",
    "Message",
    "ProtocolError",
    "decode_reply",
    "encode_ack",
    "encode_error",
    "encode_message",
    "parse_frame",
    "reject",
]

MAX_SEQ: Final = 2**63 - 1
#: Deepest nesting of lists/maps accepted inside ``data`` (the top-level message
#: map is not counted).  MessagePack's packer stops at 511 levels and json's
#: encoder near the recursion limit; 64 leaves room for both.
MAX_DEPTH: Final = 64

_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1  # msgpack uint64
_SHOW: Final = 48  # characters of an offending value quoted in a reason

#: ``ErrorReply.kind`` codes, one per kind of refusal (bounded: usable as a metric label).
KINDS: Final = (
    "undecodable",  # not MessagePack / not JSON
    "not_a_map",  # decoded, but not a map/object
    "bad_seq",  # seq missing or not an integer in [0, 2**63-1]
    "missing_data",  # no data key
    "bad_data",  # data holds something the store cannot keep as JSON
    "bad_ts",  # ts neither null nor a finite number
    "too_large",  # the record does not fit (checked by the front, see reject())
)


class ProtocolError(NodeError, ValueError):
    """Raised on the client side: a message that would be refused, or a reply that
    is not protocol v1."""


@dataclass(frozen=True, slots=True)
class Message:
    """An accepted device message."""

    seq: int
    ts: int | float | None
    data: Any
    binary: bool


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A refused frame: what to answer, and a short ``kind`` for counting."""

    kind: str
    reason: str
    seq: int | None
    binary: bool

    @property
    def frame(self) -> bytes | str:
        return encode_error(self.reason, self.seq, self.binary)


@dataclass(frozen=True, slots=True)
class Ack:
    """A decoded ``{"ack": n}``: every message with ``seq <= n`` sent on the
    connection is durable."""

    n: int
    binary: bool


# --------------------------------------------------------------------- encoding
# typed here once: msgpack ships no annotations
_pack: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack


def encode_ack(n: int, binary: bool) -> bytes | str:
    """``{"ack": n}`` as a MessagePack map (binary) or a JSON object (text)."""
    if binary:
        return _pack({"ack": n})
    return f'{{"ack":{n}}}'


def encode_error(reason: str, seq: int | None, binary: bool) -> bytes | str:
    """``{"error": reason, "seq": seq}`` (``seq`` may be ``None`` -> null)."""
    obj = {"error": reason, "seq": seq}
    if binary:
        return _pack(obj)
    return json.dumps(obj, separators=(",", ":"))


# A bounded repr: a few levels, a few items each, so a deeply nested or huge value
# (a 1 KB frame can hold a 1,000-level list) costs O(1) and never recurses deeply.
_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxtuple = _repr.maxlist = _repr.maxdict = _repr.maxset = 4
# long strings and numbers are cut below (keeping the start), not in the middle by reprlib
_repr.maxstring = _repr.maxother = 4 * _SHOW
_repr.maxlong = 10_000


def _show(value: Any) -> str:
    """A short, safe rendering of an offending value for a reason string."""
    try:
        text = _repr.repr(value)
    except (RecursionError, ValueError):  # pragma: no cover - reprlib bounds the depth
        text = f"<{type(value).__name__}>"
    if len(text) > _SHOW:
        text = text[: _SHOW - 3] + "..."
    return text


def reject(kind: str, reason: str, seq: int | None, binary: bool) -> ErrorReply:
    """The single constructor of refusals (``kind`` must be one of :data:`KINDS`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown error kind {kind!r}, expected one of {KINDS}")
    return ErrorReply(kind, reason, seq, binary)


# --------------------------------------------------------------------- decoding
class _Refused(Exception):
    """Internal: carries a refusal out of the decoders and the data walk."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason


class _NonFinite:
    """What JSON's ``NaN``/``Infinity``/``-Infinity`` decode to: refused wherever it
    appears, with the seq still known when it is valid."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_json_decoder = json.JSONDecoder(parse_constant=_NonFinite)


def _decode_text(frame: str) -> Any:
    try:
        return _json_decoder.decode(frame)
    except RecursionError:
        raise _Refused("undecodable", "undecodable JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, int digits limit
        pos = getattr(exc, "pos", None)
        where = f" at character {pos}" if pos is not None else ""
        raise _Refused("undecodable", f"undecodable JSON{where} ({len(frame)} characters)") from None


def _decode_binary(frame: bytes) -> Any:
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=False, use_list=True, timestamp=0)
    except (ValueError, TypeError, msgpack.UnpackException):
        # FormatError, StackError, ExtraData, bad UTF-8, incomplete input, unhashable keys
        raise _Refused("undecodable", f"undecodable MessagePack ({len(frame)} bytes)") from None


def _check_data(data: Any, check_strings: bool) -> None:
    """Walk ``data`` iteratively; raise _Refused for anything JSON cannot hold."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    pop = stack.pop
    push = stack.append
    while stack:
        value, depth = pop()
        cls = type(value)
        if cls is str:
            if check_strings:
                _check_string(value)
        elif cls is int:
            if not _INT_MIN <= value <= _INT_MAX:
                raise _Refused("bad_data", f"data holds an integer outside the 64-bit range: {_show(value)}")
        elif cls is float:
            if not math.isfinite(value):
                raise _Refused("bad_data", f"data holds a non-finite number {value!r}")
        elif value is None or cls is bool:
            pass
        elif cls is _NonFinite:
            raise _Refused("bad_data", f"data holds a non-finite number {value.name}")
        elif cls is dict:
            if depth >= MAX_DEPTH:
                raise _Refused("bad_data", f"data nests deeper than {MAX_DEPTH} levels")
            for key, item in value.items():
                if type(key) is not str:
                    raise _Refused(
                        "bad_data", f"data map keys must be strings, got {type(key).__name__} {_show(key)}"
                    )
                if check_strings:
                    _check_string(key)
                push((item, depth + 1))
        elif cls is list:
            if depth >= MAX_DEPTH:
                raise _Refused("bad_data", f"data nests deeper than {MAX_DEPTH} levels")
            for item in value:
                push((item, depth + 1))
        elif cls is bytes:
            raise _Refused(
                "bad_data", f"data holds a MessagePack bin value ({len(value)} bytes); use a string or a list"
            )
        elif isinstance(value, (msgpack.ExtType, msgpack.Timestamp)):
            code = value.code if isinstance(value, msgpack.ExtType) else -1
            raise _Refused("bad_data", f"data holds a MessagePack ext value (type {code})")
        else:  # pragma: no cover - the decoders produce nothing else
            raise _Refused("bad_data", f"data holds an unsupported {type(value).__name__} value")


def _check_string(value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Refused("bad_data", f"data holds a lone surrogate in the string {_show(value)}") from None


def _valid_seq(seq: Any) -> bool:
    return type(seq) is int and 0 <= seq <= MAX_SEQ


def _message(obj: Any, binary: bool, check_strings: bool) -> Message | ErrorReply:
    if type(obj) is not dict:
        return ErrorReply("not_a_map", f"expected a map/object, got {_type_name(obj, binary)}", None, binary)
    if "seq" not in obj:
        return ErrorReply("bad_seq", "seq is missing", None, binary)
    seq = obj["seq"]
    if not _valid_seq(seq):
        if type(seq) is int and seq > MAX_SEQ:
            reason = f"seq must be at most 2**63-1, got {_show(seq)}"
        else:
            reason = f"seq must be a non-negative integer, got {_show(seq)}"
        return ErrorReply("bad_seq", reason, None, binary)
    if "data" not in obj:
        return ErrorReply("missing_data", "data is missing", seq, binary)
    ts = obj.get("ts")
    if ts is not None:
        cls = type(ts)
        if cls is float:
            if not math.isfinite(ts):
                return ErrorReply("bad_ts", f"ts must be a finite number, got {ts!r}", seq, binary)
        elif cls is _NonFinite:
            return ErrorReply("bad_ts", f"ts must be a finite number, got {ts!r}", seq, binary)
        elif cls is int:
            if not _INT_MIN <= ts <= _INT_MAX:
                return ErrorReply("bad_ts", f"ts is outside the 64-bit range: {_show(ts)}", seq, binary)
        else:
            return ErrorReply(
                "bad_ts",
                f"ts must be a number or null, got {_type_name(ts, binary)} {_show(ts)}",
                seq,
                binary,
            )
    data = obj["data"]
    try:
        _check_data(data, check_strings)
    except _Refused as refused:
        return ErrorReply(refused.kind, refused.reason, seq, binary)
    return Message(seq, ts, data, binary)


def _type_name(value: Any, binary: bool) -> str:
    """Name a decoded value's type in the device's vocabulary."""
    if binary:
        names = {list: "array", str: "str", bytes: "bin", int: "int", float: "float", bool: "bool"}
    else:
        names = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    if value is None:
        return "nil" if binary else "null"
    if isinstance(value, (msgpack.ExtType, msgpack.Timestamp)):
        return "ext"
    if isinstance(value, _NonFinite):
        return "number"
    return names.get(type(value), type(value).__name__)


def parse_frame(frame: bytes | str) -> Message | ErrorReply:
    """Decode one device frame: an accepted :class:`Message` or an :class:`ErrorReply`.

    ``bytes`` is a binary frame (MessagePack), ``str`` a text frame (JSON).  Never
    raises for any input of those two types.
    """
    binary = not isinstance(frame, str)
    try:
        if isinstance(frame, str):
            obj = _decode_text(frame)
            # Lone surrogates can only come from \\uXXXX escapes.
            check_strings = "\\u" in frame
        else:
            obj = _decode_binary(frame)
            check_strings = False  # msgpack with raw=False only yields valid UTF-8
    except _Refused as refused:
        return ErrorReply(refused.kind, refused.reason, None, binary)
    return _message(obj, binary, check_strings)


# ------------------------------------------------------------------ client side
def encode_message(seq: int, data: Any, ts: int | float | None = None, binary: bool = True) -> bytes | str:
    """Encode a device message; raise :class:`ProtocolError` if the node would refuse it."""
    if not _valid_seq(seq):
        raise ProtocolError(f"seq must be an integer in [0, 2**63-1], got {_show(seq)}")
    if ts is not None and (type(ts) not in (int, float) or (type(ts) is float and not math.isfinite(ts))):
        raise ProtocolError(f"ts must be a finite number or None, got {_show(ts)}")
    try:
        _check_data(data, check_strings=True)
    except _Refused as refused:
        raise ProtocolError(refused.reason) from None
    obj: dict[str, Any] = {"seq": seq, "data": data}
    if ts is not None:
        obj["ts"] = ts
    if binary:
        return _pack(obj)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def decode_reply(frame: bytes | str) -> Ack | ErrorReply:
    """Decode a node → device frame (``{"ack": n}`` or ``{"error": ..., "seq": ...}``)."""
    binary = not isinstance(frame, str)
    try:
        obj = _decode_binary(frame) if binary else _decode_text(frame)  # type: ignore[arg-type]
    except _Refused as refused:
        raise ProtocolError(f"reply is {refused.reason}") from None
    if type(obj) is dict:
        if "ack" in obj:
            n = obj["ack"]
            if _valid_seq(n):
                return Ack(n, binary)
            raise ProtocolError(f"ack must be a non-negative integer, got {_show(n)}")
        if "error" in obj:
            reason, seq = obj["error"], obj.get("seq")
            if type(reason) is str and (seq is None or _valid_seq(seq)):
                return ErrorReply(_kind_of(reason), reason, seq, binary)
            raise ProtocolError(f"malformed error reply {_show(obj)}")
    raise ProtocolError(f"expected an ack or an error reply, got {_show(obj)}")


def _kind_of(reason: str) -> str:
    """Best-effort kind of a received error reason (the wire carries only the text)."""
    if reason.startswith(("undecodable",)):
        return "undecodable"
    if reason.startswith("expected a map"):
        return "not_a_map"
    if reason.startswith("seq"):
        return "bad_seq"
    if reason.startswith("data is missing"):
        return "missing_data"
    if reason.startswith("ts"):
        return "bad_ts"
    if reason.startswith("message too large"):
        return "too_large"
    return "bad_data"
