"""Structured fuzzing of the device protocol (issue 14): whatever a frame holds --
nested MessagePack or JSON of every type, nesting up to and past the decoders'
limits, raw bytes, broken text -- ``parse_frame`` returns an accepted ``Message``
(that the store can keep) or an ``ErrorReply`` (that encodes), never raises, in
bounded time; ``decode_reply`` returns an ``Ack``/``ErrorReply`` or raises
``ProtocolError``, nothing else.

The default suite runs a bounded budget; ``IOTNODE_FUZZ_EXAMPLES=20000 python -m
pytest tests/security/test_fuzz_protocol.py`` runs longer.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.protocol import Ack, ErrorReply, Message, ProtocolError, decode_reply, parse_frame
from node.record import pack_record

EXAMPLES = int(os.environ.get("IOTNODE_FUZZ_EXAMPLES", "300"))
PER_FRAME = 0.5  # seconds: far above the real cost (microseconds), far below a hang

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # timed by hand below (a shared machine makes hypothesis' deadline flaky)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(st.one_of(st.text(max_size=10), st.integers(-5, 5)), children, max_size=6),
    ),
    max_leaves=40,
)


@st.composite
def deep(draw: st.DrawFn) -> Any:
    """A value nested 1..1100 levels (msgpack's stack ends at 1024, repr's at 1000)."""
    depth = draw(st.one_of(st.integers(1, 1100), st.integers(900, 1030)))
    shape = draw(st.sampled_from(["list", "map", "alternate"]))
    value: Any = draw(scalars)
    for level in range(depth):
        as_list = shape == "list" or (shape == "alternate" and level % 2 == 0)
        value = [value] if as_list else {"k": value}
    return value


anything = st.one_of(values, deep())
keys = st.sampled_from(["seq", "data", "ts", "ack", "error", "x"])


@st.composite
def message_maps(draw: st.DrawFn) -> Any:
    obj = draw(st.dictionaries(keys, anything, max_size=4))
    if draw(st.booleans()):
        obj["seq"] = draw(st.one_of(st.integers(min_value=-5, max_value=2**64), anything))
    if draw(st.booleans()):
        obj["data"] = draw(anything)
    return draw(st.one_of(st.just(obj), anything))


def _msgpack(obj: Any) -> bytes | None:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):
        return None


def _json(obj: Any) -> str | None:
    try:
        return json.dumps(obj, allow_nan=True)
    except (ValueError, TypeError, RecursionError):
        return None


@st.composite
def frames(draw: st.DrawFn) -> bytes | str:
    kind = draw(st.sampled_from(["msgpack", "json", "bytes", "text", "nested-text", "nested-msgpack"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return draw(st.text(max_size=300))
    if kind == "nested-text":  # JSON nesting past the decoder's recursion limit
        depth = draw(st.integers(1, 3000))
        opener = draw(st.sampled_from(["[", '{"a":']))
        closer = "]" if opener == "[" else "}"
        return '{"seq": 1, "data": ' + opener * depth + "0" + closer * depth + "}"
    if kind == "nested-msgpack":  # built by hand: msgpack's own packer stops at 511 levels
        depth = draw(st.one_of(st.integers(1, 1100), st.integers(900, 1030)))  # around the limits
        level = draw(st.sampled_from([b"\x91", b"\x81\xa1k"]))
        nested = level * depth + b"\x00"
        where = draw(st.sampled_from(["seq", "ts", "data"]))
        fields = {"seq": b"\x01", "data": b"\x01", "ts": b"\xc0", where: nested}
        return b"\x83" + b"".join(_msgpack(k) + v for k, v in fields.items())  # type: ignore[operator]
    obj = draw(message_maps())
    encoded = _msgpack(obj) if kind == "msgpack" else _json(obj)
    return encoded if encoded is not None else draw(st.binary(max_size=50))


def _stack_depth() -> int:
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back  # type: ignore[assignment]
    return depth


def _timed(call: Any, frame: bytes | str) -> Any:
    """``call(frame)`` under the interpreter's default recursion limit (hypothesis raises
    it while a test runs; the node runs with 1000), timed."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(_stack_depth() + 50, 1000))
    start = time.perf_counter()
    try:
        return call(frame)
    finally:
        took = time.perf_counter() - start
        sys.setrecursionlimit(limit)
        assert took < PER_FRAME, f"{took:.3f} s for a {len(frame)}-byte frame"


@FUZZ
@given(frames())
def test_parse_frame_only_ever_accepts_or_answers_an_error(frame: bytes | str) -> None:
    result = _timed(parse_frame, frame)
    binary = isinstance(frame, bytes)
    if type(result) is Message:
        assert type(result.seq) is int and 0 <= result.seq <= 2**63 - 1
        assert result.ts is None or (type(result.ts) in (int, float) and math.isfinite(result.ts))
        assert result.binary is binary
        json.dumps(result.data, allow_nan=False)  # the store keeps data as JSON text
        pack_record("d", result.seq, result.ts, 1.0, result.data)  # and the ring as an envelope
    else:
        assert type(result) is ErrorReply
        assert result.binary is binary
        reply = result.frame
        decoded = msgpack.unpackb(reply) if binary else json.loads(reply)
        assert set(decoded) == {"error", "seq"} and isinstance(decoded["error"], str)
        assert len(result.reason) < 300


@FUZZ
@given(frames())
def test_decode_reply_returns_a_reply_or_raises_protocol_error(frame: bytes | str) -> None:
    try:
        result = _timed(decode_reply, frame)
    except ProtocolError:
        return
    assert type(result) in (Ack, ErrorReply)
