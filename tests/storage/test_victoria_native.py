"""The VictoriaMetrics sink's C formatter (``node/storage/_vmlines.c``) against the Python one.

``batch_body`` must give, byte for byte, the body the Python formatter ``batch_lines``
gives -- and the same count of skipped values -- for any row the store can hold:
hypothesis writes ``data`` texts (numbers as any JSON number text, nested objects, keys
with every kind of character, escapes, repeated keys, whitespace) and times (none, the
device's, one too far off, half-millisecond ties).  Rows the C code hands back to Python
must be exactly the odd ones: the common shapes never call the fallback.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.registry import DeviceContext, Registry
from node.storage import victoria as vmsink
from node.storage.enrich import batch_of
from node.storage.source import RawRow

NOW = 1_796_083_200.0

REGISTRY = Registry(
    {
        "d,1=x\\": DeviceContext("d,1=x\\", "thermo v2", "c=1", "r,1", "site", 1.0, 2.0, "u0abc", {"k": "v"}),
        "dé": DeviceContext("dé", "météo", "", "eu\nwest", "", None, None, ""),
    }
)
DEVICES = ["d,1=x\\", "dé", "plain", "9lives"]  # the last two are unknown: type "unknown"

number_text = st.from_regex(r"-?(0|[1-9][0-9]{0,22})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?", fullmatch=True)
key_text = st.one_of(
    st.sampled_from(["temp", "", "a b", "1st", "x-y", "_", "é", "ключ", "🙂", "a_b", "value", "iotnode_seq"]),
    st.text(max_size=6),
)


def quoted(key: str, ascii_only: bool) -> str:
    return json.dumps(key, ensure_ascii=ascii_only)


@st.composite
def value_text(draw: st.DrawFn, depth: int = 0) -> str:
    kind = draw(st.sampled_from(["num", "num", "int", "float", "bool", "null", "str", "list", "obj"]))
    if kind == "num":
        return draw(number_text)
    if kind == "int":
        return str(draw(st.integers(min_value=-(2**70), max_value=2**70)))
    if kind == "float":
        return repr(draw(st.floats(allow_nan=False, allow_infinity=False)))
    if kind == "bool":
        return draw(st.sampled_from(["true", "false"]))
    if kind == "null":
        return "null"
    if kind == "str":
        return json.dumps(draw(st.text(max_size=5)), ensure_ascii=draw(st.booleans()))
    if kind == "list" or depth >= 5:
        items = draw(st.lists(st.sampled_from(["1", '"s"', "[]", "{}", '{"a":1}', "null"]), max_size=3))
        return "[" + ",".join(items) + "]"
    return draw(object_text(depth + 1))


@st.composite
def object_text(draw: st.DrawFn, depth: int = 0) -> str:
    keys = draw(st.lists(key_text, max_size=5))
    if keys and draw(st.integers(0, 9)) == 0:
        keys.append(keys[0])  # a repeated key: the last value at the first key's place
    ascii_only = draw(st.booleans())
    gap = draw(st.sampled_from(["", " ", "\n\t "]))
    members = [f"{gap}{quoted(k, ascii_only)}{gap}:{gap}{draw(value_text(depth))}" for k in keys]
    return "{" + ",".join(members) + gap + "}"


data_text = st.one_of(object_text(), object_text(), value_text())


@st.composite
def store_rows(draw: st.DrawFn) -> list[RawRow]:
    rows: list[RawRow] = []
    for i in range(draw(st.integers(1, 6))):
        at = NOW + draw(st.integers(0, 10**6)) / 1000 + draw(st.sampled_from([0.0, 0.0005, 0.0015]))
        ts = draw(
            st.sampled_from(
                [None, at - 2.5, at - 2 * 365 * 86400, at + 0.0005, float("inf"), float("nan"), 12.3456785]
            )
        )
        seq = draw(st.one_of(st.integers(0, 2**40), st.integers(2**63, 2**64)))
        rows.append((i + 1, draw(st.sampled_from(DEVICES)), seq, ts, at, draw(data_text)))
    return rows


def python_body(rows: list[RawRow]) -> tuple[bytes, int]:
    lines, skipped = vmsink.batch_lines(batch_of(rows, REGISTRY))
    return "".join(line + "\n" for line in lines).encode(), skipped


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(store_rows())
def test_the_c_body_is_the_python_body_byte_for_byte(rows: list[RawRow]) -> None:
    assert vmsink.batch_body(batch_of(rows, REGISTRY)) == python_body(rows)


COMMON = [
    '{"temp":20.5,"hum":40,"ok":true,"s":"text","n":null,"l":[1,2]}',
    '{"gps":{"lat":1.5,"lon":-2,"fix":{"q":3,"deep":{"x":1}}},"":7,"a b/c":1e300,"é":2}',
    '{ "t" : -0.0 , "u" : 1E-5 , "v" : 123456789012345678 }',
    "42",
    "3.25",
    '"a string"',
    "[]",
    "{}",
    '{"s":"\\ud800","v":1}',  # a lone surrogate escape in a value (orjson refuses it): skipped
]
ODD = [
    '{"k\\u00e9":1}',  # an escaped key
    '{"a":1,"b":2,"a":3}',  # a repeated key
    '{"big":1234567890123456789}',  # 19 digits: orjson may make a float of it
    '{"z":-0}',  # orjson reads -0 as 0
    '{"inf":1e400}',  # orjson refuses it, json reads inf
]


def rows_of(texts: list[str]) -> list[RawRow]:
    return [(i + 1, DEVICES[i % 4], i, NOW - i, NOW + i / 1000, text) for i, text in enumerate(texts)]


def test_only_odd_rows_go_back_to_python() -> None:
    calls: list[RawRow] = []

    def fallback(raw: RawRow, prefixes: dict[str, str]) -> tuple[str, int]:
        calls.append(raw)
        return vmsink.raw_line(raw, prefixes)

    rows = rows_of(COMMON + ODD)
    batch = batch_of(rows, REGISTRY)
    prefixes = {d: vmsink._prefix(d, ctx) for d, ctx in batch.contexts.items()}
    body, skipped = vmsink.format_batch(batch.raw, prefixes, fallback)
    assert [r[5] for r in calls] == ODD
    assert (body, skipped) == python_body(rows)
    assert body.decode().splitlines()[0].endswith(" temp=20.5,hum=40,ok=1,iotnode_seq=0 1796083200000")


def test_an_unknown_prefix_and_a_failing_fallback_raise_as_python_would() -> None:
    with pytest.raises(KeyError, match="d,1=x"):
        vmsink.format_batch(rows_of(['{"a":1}']), {}, vmsink.raw_line)  # the fallback's prefixes[device_id]

    def broken(raw: RawRow, prefixes: dict[str, str]) -> tuple[str, int]:
        raise ValueError(f"cannot format {raw[5]!r}")

    batch = batch_of(rows_of(ODD[:1]), REGISTRY)
    prefixes = {d: vmsink._prefix(d, ctx) for d, ctx in batch.contexts.items()}
    with pytest.raises(ValueError, match="cannot format"):
        vmsink.format_batch(batch.raw, prefixes, broken)
    with pytest.raises(TypeError, match=r"must return \(str, int\)"):
        vmsink.format_batch(batch.raw, prefixes, lambda raw, prefixes: None)
    assert vmsink.format_batch([], {}, vmsink.raw_line) == (b"", 0)


MALFORMED = ['{"a":1 x}', '{"a":1,}', '{"a":1} 2', "[1,", '{"a":01}', '{"a":1.}', '{"a":"\x01"}', "", "nul"]


def test_text_that_is_not_json_reaches_python_and_fails_there_as_before() -> None:
    """The store holds JSON only, but a row that is not must fail as the Python formatter fails
    (orjson's and json's error), never be written half."""
    for text in MALFORMED:
        batch = batch_of(rows_of(['{"ok":1}', text]), REGISTRY)
        with pytest.raises(ValueError) as python_error:
            vmsink.batch_lines(batch)
        with pytest.raises(ValueError) as c_error:
            vmsink.batch_body(batch)
        assert type(c_error.value) is type(python_error.value), text
        assert str(c_error.value) == str(python_error.value), text
