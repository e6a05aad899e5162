"""The PostgreSQL sink's C ``COPY`` formatter (``node/storage/_pgcopy.c``) against the Python one.

For a batch read in columns (the C reader), ``copy_data`` must give, byte for byte, the UTF-8
of the Python ``copy_text`` of the same rows read by sqlite3, and the same UTC days (the
partitions the batch needs): hypothesis writes device ids and contexts with every character
COPY escapes, ``data`` texts with escapes and NUL escapes, times of any sign and size
(half-microsecond ties, around midnights, years the C code leaves to Python).  Then the same
batch through the sink into a real PostgreSQL must store what the Python path stores.
"""

from __future__ import annotations

import math
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.storage import postgres as pgsink
from node.storage.enrich import ColumnBatch, read_batch, read_column_batch
from node.storage.postgres import PostgresSink, copy_data, copy_text, pg_day
from node.storage.source import StoreLog
from tests.storage.conftest import PgServer
from tests.storage.test_postgres_sink import MIDNIGHT, ODD, expected, odd_rows, registry_of, stored
from tests.storage.test_storeread import make_store
from tests.storage.test_victoria_native import data_text

pytestmark = pytest.mark.skipif(pgsink.format_copy is None, reason="node.storage._pgcopy is not built")

PREFIX = "pgn-"
REGISTRY = registry_of(PREFIX)
# the last three are not in the registry
DEVICES = [f"{PREFIX}odd{ODD}", f"{PREFIX}plain", f"{PREFIX}ghost\\N\t", "dé", ""]

# NUL escapes (jsonb_text), and each character COPY escapes alone in the text (JSON whitespace)
EXTRA_DATA = ['{"s":"a\\u0000b"}', '{"s":"\\\\u0000"}', ODD, '{"v":\r1}', '{"v":1}\n', "\t[1]", "\\"]

received_at = st.one_of(
    st.floats(min_value=-3e10, max_value=2.5e11, allow_nan=False),  # beyond 1000..9999: Python's part
    st.integers(-(10**7), 10**7).map(lambda k: MIDNIGHT + k * 5e-7),  # half-microsecond steps
    st.sampled_from([MIDNIGHT - 4e-7, MIDNIGHT - 6e-7, MIDNIGHT, 0.0, -0.5e-6, 946684800.0000005]),
)


@st.composite
def stored_rows(draw: st.DrawFn) -> list[tuple[str, int, float | None, float, str]]:
    rows = []
    for seq in range(draw(st.integers(1, 30))):
        at = draw(received_at)
        ts = draw(st.one_of(st.none(), st.floats(allow_nan=False), st.just(at)))
        text = draw(st.one_of(data_text, st.sampled_from(EXTRA_DATA)))
        rows.append((draw(st.sampled_from(DEVICES)), seq, ts, at, text))
    return rows


def both_ways(path: Path) -> tuple[ColumnBatch, object]:
    columns, rows = StoreLog(path), StoreLog(path, columnar=False)
    assert columns.open() and rows.open()
    try:
        columnar = read_column_batch(columns, 0, 10_000, REGISTRY)
        python = read_batch(rows, 0, 10_000, REGISTRY)
    finally:
        columns.close()
        rows.close()
    assert isinstance(columnar, ColumnBatch) and python is not None
    return columnar, python


def python_data(batch: object) -> tuple[bytes, set[int]]:
    return "".join(copy_text(batch)).encode(), set(map(pg_day, (r[4] for r in batch.raw)))  # type: ignore[attr-defined]


def c_data(batch: ColumnBatch) -> tuple[bytes, set[int]] | None:
    """The C formatter's body and days, or None when it left the batch to Python."""
    fields = [pgsink._device_fields(d, batch.contexts[d]) for d in batch.cols.devices]
    made = pgsink.format_copy(batch.cols, [f[0] for f in fields], [f[1] for f in fields], pgsink._data_field)
    return None if made is None else (made[0], set(made[1]))


def c_formats(at: float) -> bool:
    """Whether the C code formats this receive time: finite, and a year 1000..9999 once rounded
    to the microsecond as PostgreSQL rounds it."""
    if not math.isfinite(at):
        return False
    micros = round((at - 946684800.0) * 1e6)
    if abs(micros) > 4e17:
        return False
    return -30610224000 <= micros // 1_000_000 + 946684800 <= 253402300799  # 1000-01-01 .. 9999-12-31


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stored_rows())
def test_the_c_copy_data_is_the_python_copy_text_byte_for_byte(rows: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.sqlite3"
        make_store(path, rows)
        columnar, python = both_ways(path)
        c = c_data(columnar)
        assert (c is not None) == all(c_formats(r[3]) for r in rows)
        try:
            want = python_data(python)
        except (OverflowError, ValueError):  # a time datetime cannot hold: Python's error, as before
            assert c is None
            with pytest.raises((OverflowError, ValueError)):
                chunks, _ = copy_data(columnar)
                list(chunks)
            return
        if c is not None:
            assert c == want
        chunks, days = copy_data(columnar)
        assert b"".join(c.encode() if isinstance(c, str) else bytes(c) for c in chunks) == want[0]
        assert days == want[1]


def test_plain_rows_never_call_python_and_escaped_data_does_once_each() -> None:
    datas = ['{"v":1}', '{"s":"tab\\t"}', '{"v":2.5,"w":[1]}', '{"s":"a\\u0000b"}']
    rows = [(DEVICES[i % len(DEVICES)], i, None if i % 2 else MIDNIGHT - i, MIDNIGHT + i / 7, datas[i % 4])
            for i in range(40)]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.sqlite3"
        make_store(path, rows)
        columnar, python = both_ways(path)
    calls: list[str] = []

    def data_field(text: str) -> str:
        calls.append(text)
        return pgsink._data_field(text)

    fields = [pgsink._device_fields(d, columnar.contexts[d]) for d in columnar.cols.devices]
    body, days = pgsink.format_copy(columnar.cols, [f[0] for f in fields], [f[1] for f in fields], data_field)
    assert (body, set(days)) == python_data(python)
    assert calls == [r[4] for r in rows if "\\" in r[4]]
    assert days == list(dict.fromkeys(pg_day(r[3]) for r in rows))  # each once, first seen first


def test_bad_arguments_raise_naming_what_is_wrong() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.sqlite3"
        make_store(path, [("dé", 1, None, MIDNIGHT, '{"v":1}')])
        columnar, _ = both_ways(path)
    cols = columnar.cols
    with pytest.raises(TypeError, match="expected 4 arguments"):
        pgsink.format_copy(cols, [], [])
    with pytest.raises(TypeError, match="Columns"):
        pgsink.format_copy(tuple(cols)[:5], ["a"], ["b"], str)
    with pytest.raises(ValueError, match="one str per device"):
        pgsink.format_copy(cols, [], ["\t"], str)
    with pytest.raises(TypeError, match=r"contexts\[0\] is not a str"):
        pgsink.format_copy(cols, ["a"], [b"\t"], str)
    with pytest.raises(ValueError, match="column seq"):
        pgsink.format_copy(cols._replace(seq=b"\0"), ["a"], ["\t"], str)
    with pytest.raises(ValueError, match="out of range"):
        pgsink.format_copy(cols._replace(device_index=b"\x05\0\0\0"), ["a"], ["\t"], str)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.sqlite3"
        make_store(path, [("dé", 1, None, MIDNIGHT, '{"s":"\\t"}')])
        escaped, _ = both_ways(path)
    with pytest.raises(TypeError, match="data_field must return a str"):
        pgsink.format_copy(escaped.cols, ["a"], ["\t"], lambda text: b"x")
    with pytest.raises(ZeroDivisionError):
        pgsink.format_copy(escaped.cols, ["a"], ["\t"], lambda text: 1 / 0)


def test_a_batch_read_in_columns_is_stored_as_the_python_path_stores_it(pg: PgServer) -> None:
    """Through the sink into the real server: the C text gives the rows the Python text gives."""
    prefix = f"pgn{random.randrange(1 << 30):x}-"
    registry = registry_of(prefix)
    raw = odd_rows(prefix)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.sqlite3"
        make_store(path, [r[1:] for r in raw])
        source = StoreLog(path)
        assert source.open()
        sink = PostgresSink(pg.dsn, prefix + "source")
        sink.open()
        try:
            assert sink._native
            batch = sink.read(source, 0, 10_000, registry)
            assert isinstance(batch, ColumnBatch)
            sink.write(batch)
        finally:
            sink.close()
            source.close()
    got = stored(pg, prefix)
    assert got == expected(batch)
    assert {r[13] for r in got} == {"iotnode_messages_20261130", "iotnode_messages_20261201"}
