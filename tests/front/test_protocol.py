"""Device protocol v1 (contract 3) from plain bytes and strings: no server."""

from __future__ import annotations

import json
import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.protocol import (
    KINDS,
    MAX_DEPTH,
    MAX_SEQ,
    Ack,
    ErrorReply,
    Message,
    ProtocolError,
    decode_reply,
    encode_ack,
    encode_error,
    encode_message,
    parse_frame,
    reject,
)
from node.record import pack_record, unpack_record


def mp(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def js(obj: object) -> str:
    return json.dumps(obj)


def refused(frame: bytes | str) -> ErrorReply:
    result = parse_frame(frame)
    assert isinstance(result, ErrorReply), result
    assert result.kind in KINDS
    return result


# ------------------------------------------------------------------ accepted
@pytest.mark.parametrize("encode,binary", [(mp, True), (js, False)])
def test_valid_message_is_accepted_in_both_encodings(encode, binary) -> None:
    data = {"temp": 21.5, "tags": ["a", "b"], "ok": True, "none": None, "n": -7}
    result = parse_frame(encode({"seq": 3, "ts": 1700000000.25, "data": data}))
    assert result == Message(seq=3, ts=1700000000.25, data=data, binary=binary)


@pytest.mark.parametrize("encode", [mp, js])
def test_ts_may_be_absent_null_int_or_float(encode) -> None:
    assert parse_frame(encode({"seq": 0, "data": 1})).ts is None
    assert parse_frame(encode({"seq": 0, "data": 1, "ts": None})).ts is None
    assert parse_frame(encode({"seq": 0, "data": 1, "ts": 17})).ts == 17
    assert parse_frame(encode({"seq": 0, "data": 1, "ts": 17.5})).ts == 17.5


@pytest.mark.parametrize("encode", [mp, js])
@pytest.mark.parametrize("data", [None, 0, "x", [], {}, [1, [2, [3]]], {"a": {"b": None}}, False, 2.5])
def test_data_may_be_any_json_value(encode, data) -> None:
    assert parse_frame(encode({"seq": 1, "data": data})).data == data


@pytest.mark.parametrize("encode", [mp, js])
def test_seq_bounds_zero_and_int64_max_are_accepted(encode) -> None:
    assert parse_frame(encode({"seq": 0, "data": 1})).seq == 0
    assert parse_frame(encode({"seq": MAX_SEQ, "data": 1})).seq == MAX_SEQ


def test_unknown_keys_are_ignored() -> None:
    assert parse_frame(js({"seq": 1, "data": 2, "v": 9})) == Message(1, None, 2, False)


def test_msgpack_uint64_and_int64_extremes_in_data_are_accepted() -> None:
    result = parse_frame(mp({"seq": 1, "data": [2**64 - 1, -(2**63)]}))
    assert isinstance(result, Message) and result.data == [2**64 - 1, -(2**63)]


def test_accepted_data_fits_the_ring_envelope_and_json() -> None:
    result = parse_frame(js({"seq": 5, "data": {"é": "\U0001f600", "big": 2**64 - 1}}))
    assert isinstance(result, Message)
    record = unpack_record(pack_record("dev", result.seq, result.ts, 1.0, result.data))
    assert record.data == result.data
    assert json.loads(json.dumps(record.data, allow_nan=False)) == result.data


def test_valid_surrogate_pair_escape_is_accepted() -> None:
    result = parse_frame('{"seq": 1, "data": "\\ud83d\\ude00"}')
    assert isinstance(result, Message) and result.data == "\U0001f600"


# ------------------------------------------------------------------ refused
@pytest.mark.parametrize(
    "frame",
    [b"", b"\xc1", b"\x92\x01", mp({"seq": 1, "data": 1}) + b"\x00", b"\xa2\xff\xfe", b"\x91" * 5000],
    ids=["empty", "reserved-byte", "truncated", "trailing-bytes", "bad-utf8", "too-deep"],
)
def test_undecodable_msgpack_is_refused_with_null_seq(frame: bytes) -> None:
    reply = refused(frame)
    assert reply.kind == "undecodable" and reply.seq is None and reply.binary
    assert reply.reason.startswith("undecodable MessagePack")
    assert f"({len(frame)} bytes)" in reply.reason


@pytest.mark.parametrize("frame", ["", "{", "nope", '{"seq": 1, "data": 1} x', "[" * 100_000, "1" * 5000])
def test_undecodable_json_is_refused_with_null_seq(frame: str) -> None:
    reply = refused(frame)
    assert reply.kind == "undecodable" and reply.seq is None and not reply.binary
    assert reply.reason.startswith("undecodable JSON")


def test_msgpack_with_unhashable_map_key_is_undecodable() -> None:
    frame = b"\x81\x91\x01\x01"  # {[1]: 1}
    assert refused(frame).kind == "undecodable"


@pytest.mark.parametrize(
    "obj,got",
    [
        ([1, 2], "array"),
        ("x", "str"),
        (5, "int"),
        (None, "nil"),
        (True, "bool"),
        (1.5, "float"),
        (b"ab", "bin"),
    ],
)
def test_msgpack_non_map_is_refused_naming_its_type(obj: object, got: str) -> None:
    reply = refused(mp(obj))
    assert reply.kind == "not_a_map"
    assert reply.reason == f"expected a map/object, got {got}"


@pytest.mark.parametrize(
    "text,got", [("[1]", "array"), ('"x"', "string"), ("5", "number"), ("null", "null"), ("true", "boolean")]
)
def test_json_non_object_is_refused_naming_its_type(text: str, got: str) -> None:
    reply = refused(text)
    assert reply.kind == "not_a_map" and reply.reason == f"expected a map/object, got {got}"


@pytest.mark.parametrize("encode", [mp, js])
def test_missing_seq_is_refused(encode) -> None:
    reply = refused(encode({"data": 1}))
    assert reply.kind == "bad_seq" and reply.reason == "seq is missing" and reply.seq is None


@pytest.mark.parametrize(
    "seq,shown",
    [(-3, "-3"), (1.0, "1.0"), ("7", "'7'"), (None, "None"), (True, "True"), (False, "False"), ([1], "[1]")],
)
@pytest.mark.parametrize("encode", [mp, js])
def test_seq_that_is_not_a_non_negative_integer_is_refused_with_its_value(encode, seq, shown) -> None:
    reply = refused(encode({"seq": seq, "data": 1}))
    assert reply.kind == "bad_seq" and reply.seq is None
    assert reply.reason == f"seq must be a non-negative integer, got {shown}"


@pytest.mark.parametrize("encode", [mp, js])
def test_seq_above_int64_max_is_refused(encode) -> None:
    reply = refused(encode({"seq": MAX_SEQ + 1, "data": 1}))
    assert reply.kind == "bad_seq" and reply.reason == f"seq must be at most 2**63-1, got {MAX_SEQ + 1}"


def test_json_nan_seq_is_refused() -> None:
    assert refused('{"seq": NaN, "data": 1}').reason == "seq must be a non-negative integer, got NaN"


def test_huge_seq_value_is_truncated_in_the_reason() -> None:
    reply = refused(js({"seq": "x" * 10_000, "data": 1}))
    assert reply.kind == "bad_seq" and len(reply.reason) < 120 and reply.reason.endswith("...")


@pytest.mark.parametrize("encode", [mp, js])
def test_missing_data_is_refused_and_echoes_seq(encode) -> None:
    reply = refused(encode({"seq": 9}))
    assert reply.kind == "missing_data" and reply.reason == "data is missing" and reply.seq == 9


@pytest.mark.parametrize(
    "frame,reason",
    [
        ('{"seq":1,"data":1,"ts":"x"}', "ts must be a number or null, got string 'x'"),
        ('{"seq":1,"data":1,"ts":true}', "ts must be a number or null, got boolean True"),
        ('{"seq":1,"data":1,"ts":[1]}', "ts must be a number or null, got array [1]"),
        ('{"seq":1,"data":1,"ts":NaN}', "ts must be a finite number, got NaN"),
        ('{"seq":1,"data":1,"ts":-Infinity}', "ts must be a finite number, got -Infinity"),
        ('{"seq":1,"data":1,"ts":1e999}', "ts must be a finite number, got inf"),
        (mp({"seq": 1, "data": 1, "ts": float("nan")}), "ts must be a finite number, got nan"),
        (mp({"seq": 1, "data": 1, "ts": b"x"}), "ts must be a number or null, got bin b'x'"),
        (f'{{"seq":1,"data":1,"ts":{2**64}}}', f"ts is outside the 64-bit range: {2**64}"),
    ],
)
def test_bad_ts_is_refused_and_echoes_seq(frame: bytes | str, reason: str) -> None:
    reply = refused(frame)
    assert (reply.kind, reply.reason, reply.seq) == ("bad_ts", reason, 1)


@pytest.mark.parametrize(
    "frame,reason",
    [
        (
            mp({"seq": 2, "data": b"ab"}),
            "data holds a MessagePack bin value (2 bytes); use a string or a list",
        ),
        (
            mp({"seq": 2, "data": {"k": [b""]}}),
            "data holds a MessagePack bin value (0 bytes); use a string or a list",
        ),
        (mp({"seq": 2, "data": msgpack.ExtType(5, b"x")}), "data holds a MessagePack ext value (type 5)"),
        (mp({"seq": 2, "data": msgpack.Timestamp(1, 0)}), "data holds a MessagePack ext value (type -1)"),
        (mp({"seq": 2, "data": {1: "x"}}), "data map keys must be strings, got int 1"),
        (mp({"seq": 2, "data": {"a": {b"k": 1}}}), "data map keys must be strings, got bytes b'k'"),
        (mp({"seq": 2, "data": float("inf")}), "data holds a non-finite number inf"),
        (mp({"seq": 2, "data": [float("nan")]}), "data holds a non-finite number nan"),
        ('{"seq":2,"data":NaN}', "data holds a non-finite number NaN"),
        ('{"seq":2,"data":{"x":[Infinity]}}', "data holds a non-finite number Infinity"),
        ('{"seq":2,"data":-1e400}', "data holds a non-finite number -inf"),
        (f'{{"seq":2,"data":{2**64}}}', f"data holds an integer outside the 64-bit range: {2**64}"),
        ('{"seq":2,"data":"\\ud800"}', "data holds a lone surrogate in the string '\\ud800'"),
        ('{"seq":2,"data":{"\\udfff":1}}', "data holds a lone surrogate in the string '\\udfff'"),
    ],
)
def test_data_the_store_cannot_keep_as_json_is_refused_and_echoes_seq(
    frame: bytes | str, reason: str
) -> None:
    reply = refused(frame)
    assert (reply.kind, reply.reason, reply.seq) == ("bad_data", reason, 2)


@pytest.mark.parametrize("encode", [mp, js])
def test_data_nested_beyond_max_depth_is_refused(encode) -> None:
    ok: object = 1
    for _ in range(MAX_DEPTH):
        ok = [ok]
    assert isinstance(parse_frame(encode({"seq": 1, "data": ok})), Message)
    reply = refused(encode({"seq": 1, "data": [ok]}))
    assert reply.kind == "bad_data" and reply.reason == f"data nests deeper than {MAX_DEPTH} levels"


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_any_bytes_give_a_message_or_an_error_reply(frame: bytes) -> None:
    result = parse_frame(frame)
    assert isinstance(result, (Message, ErrorReply))
    if isinstance(result, Message):
        pack_record("d", result.seq, result.ts, 0.0, result.data)
        json.dumps(result.data, allow_nan=False)


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_any_text_gives_a_message_or_an_error_reply(frame: str) -> None:
    assert isinstance(parse_frame(frame), (Message, ErrorReply))


# ------------------------------------------------------------------ replies
def test_ack_encodings() -> None:
    assert msgpack.unpackb(encode_ack(42, True)) == {"ack": 42}
    assert json.loads(encode_ack(42, False)) == {"ack": 42}
    assert isinstance(encode_ack(1, True), bytes) and isinstance(encode_ack(1, False), str)


def test_error_reply_is_encoded_in_the_frames_encoding() -> None:
    text = refused('{"seq": -3, "data": 1}').frame
    assert json.loads(text) == {"error": "seq must be a non-negative integer, got -3", "seq": None}
    binary = refused(mp({"seq": 4})).frame
    assert msgpack.unpackb(binary) == {"error": "data is missing", "seq": 4}


def test_encode_error_carries_seq_or_null() -> None:
    assert json.loads(encode_error("r", None, False)) == {"error": "r", "seq": None}
    assert msgpack.unpackb(encode_error("r", 7, True)) == {"error": "r", "seq": 7}


def test_reject_builds_a_reply_and_refuses_unknown_kinds() -> None:
    reply = reject("too_large", "message too large: 9 bytes", 3, True)
    assert reply == ErrorReply("too_large", "message too large: 9 bytes", 3, True)
    with pytest.raises(ValueError, match="unknown error kind 'nope'"):
        reject("nope", "x", None, True)


# ------------------------------------------------------------------ client side
@pytest.mark.parametrize("binary", [True, False])
def test_encode_message_round_trips_through_parse_frame(binary: bool) -> None:
    frame = encode_message(7, {"t": [1, 2.5, "é"]}, ts=3.25, binary=binary)
    assert parse_frame(frame) == Message(7, 3.25, {"t": [1, 2.5, "é"]}, binary)
    assert "ts" not in (msgpack.unpackb(encode_message(1, 0)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"seq": -1, "data": 1}, "seq must be an integer"),
        ({"seq": True, "data": 1}, "seq must be an integer"),
        ({"seq": 1, "data": b"x"}, "bin value"),
        ({"seq": 1, "data": {1: 2}}, "keys must be strings"),
        ({"seq": 1, "data": math.nan}, "non-finite"),
        ({"seq": 1, "data": "\ud800"}, "lone surrogate"),
        ({"seq": 1, "data": 1, "ts": math.inf}, "ts must be a finite number"),
        ({"seq": 1, "data": 1, "ts": "x"}, "ts must be a finite number"),
    ],
)
def test_encode_message_refuses_what_the_node_would_refuse(kwargs: dict, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        encode_message(**kwargs)


def test_decode_reply_reads_acks_and_errors_in_both_encodings() -> None:
    assert decode_reply(encode_ack(5, True)) == Ack(5, True)
    assert decode_reply(encode_ack(5, False)) == Ack(5, False)
    reply = decode_reply(encode_error("seq must be a non-negative integer, got -3", None, False))
    assert isinstance(reply, ErrorReply) and reply.kind == "bad_seq" and reply.seq is None
    assert decode_reply(encode_error("data is missing", 4, True)) == ErrorReply(
        "missing_data", "data is missing", 4, True
    )


@pytest.mark.parametrize(
    "frame", [b"\xc1", "[]", '{"ack": -1}', '{"ack": true}', '{"error": 5}', "{}", '{"x": 1}']
)
def test_decode_reply_raises_protocol_error_on_foreign_frames(frame: bytes | str) -> None:
    with pytest.raises(ProtocolError):
        decode_reply(frame)
