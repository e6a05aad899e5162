"""The ring record envelope, shared by every stage.

One msgpack array per ring record, identical in the ingress and the fan-in ring,
so no stage after the front re-parses JSON::

    [device_id: str, seq: int, ts: float | int | None, received_at: float, data: Any]

``data`` holds only JSON-representable values (``node.protocol`` guarantees it), so
a sink can always write ``json.dumps(data)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack

from node.errors import NodeError


class RecordError(NodeError, ValueError):
    """Bytes that are not a valid record envelope (a bug or a foreign ring)."""


class Record(NamedTuple):
    device_id: str
    seq: int
    ts: float | int | None
    received_at: float
    data: Any


# typed here once: msgpack ships no annotations
_pack: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack


def pack_record(device_id: str, seq: int, ts: float | int | None, received_at: float, data: Any) -> bytes:
    return _pack((device_id, seq, ts, received_at, data))


def unpack_record(payload: bytes) -> Record:
    try:
        fields = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise RecordError(
            f"undecodable record envelope ({type(exc).__name__}, {len(payload)} bytes)"
        ) from None
    if not isinstance(fields, list) or len(fields) != 5:
        raise RecordError(f"expected a 5-element array, got {type(fields).__name__}")
    device_id, seq, ts, received_at, data = fields
    if not isinstance(device_id, str) or not isinstance(seq, int):
        raise RecordError(
            f"expected [str, int, ...], got [{type(device_id).__name__}, {type(seq).__name__}, ...]"
        )
    return Record(device_id, seq, ts, received_at, data)


_FIXARRAY_5 = 0x95
_FIXSTR_MIN, _FIXSTR_MAX, _STR8 = 0xA0, 0xBF, 0xD9


def device_id_of(payload: bytes) -> str:
    """The device id of an envelope without decoding its ``data`` (the publisher's topic)."""
    # Fast path (once per published record): fixarray of 5, then a fixstr or str8 id --
    # what pack_record writes for ids below 256 bytes.  Anything else: the Unpacker.
    if len(payload) > 2 and payload[0] == _FIXARRAY_5:
        kind = payload[1]
        if _FIXSTR_MIN <= kind <= _FIXSTR_MAX:
            start, length = 2, kind & 0x1F
        elif kind == _STR8:
            start, length = 3, payload[2]
        else:
            start, length = 0, 0
        if start and start + length <= len(payload):
            try:
                return payload[start : start + length].decode()
            except UnicodeDecodeError:
                raise RecordError(f"device id is not UTF-8 ({length} bytes)") from None
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(payload)
    try:
        if unpacker.read_array_header() != 5:
            raise RecordError("expected a 5-element array")
        device_id = unpacker.unpack()
    except RecordError:
        raise
    except Exception as exc:
        raise RecordError(
            f"undecodable record envelope ({type(exc).__name__}, {len(payload)} bytes)"
        ) from None
    if not isinstance(device_id, str):
        raise RecordError(f"expected a str device id, got {type(device_id).__name__}")
    return device_id
