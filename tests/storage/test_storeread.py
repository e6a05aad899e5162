"""The sinks' columnar store reader (``node/storage/_storeread.c``) against Python's sqlite3.

Rows go into a real SQLite store file (contract 5's schema, in WAL mode as the store
keeps it); ``StoreLog.read_columns`` must give exactly the rows ``StoreLog.read`` gives
(hypothesis: unicode device ids, NULL / infinite times, many devices so the C reader's
device table grows, any ``data`` text), and what the VictoriaMetrics and lake sinks make
of a batch read in columns must be what they make of the same rows read by Python:
the same ``/write`` body byte for byte, the same Arrow table.  A row the C reader does not
take (not of the store's types) names itself, and the batch is read by Python instead.
"""

from __future__ import annotations

import sqlite3
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.sinks.sqlite import SCHEMA
from node.storage import lake
from node.storage import source as store_source
from node.storage import victoria as vmsink
from node.storage.enrich import Batch, ColumnBatch, read_batch, read_column_batch
from node.storage.source import StoreLog
from tests.storage.test_victoria_native import COMMON, NOW, ODD, REGISTRY, data_text

DEVICE_IDS = ["d,1=x\\", "dé", "plain", "9lives", "🙂 dev", ""]


def make_store(path: Path, rows: list[tuple[str, int, float | None, float, str]]) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    for statement in SCHEMA:
        db.execute(statement)
    db.execute("BEGIN")
    db.executemany("INSERT INTO messages (device_id, seq, ts, received_at, data) VALUES (?,?,?,?,?)", rows)
    db.execute("COMMIT")
    db.close()


@st.composite
def stored_rows(draw: st.DrawFn) -> list[tuple[str, int, float | None, float, str]]:
    many = draw(st.booleans())  # > 256 devices: the reader's device table grows (rehash)
    count = draw(st.integers(1, 700 if many else 40))
    devices = [f"dev-{i}" for i in range(300)] if many else DEVICE_IDS + [draw(st.text(max_size=4))]
    seqs: Counter[str] = Counter()
    rows = []
    for _ in range(count):
        device = draw(st.sampled_from(devices))
        # (a receive time near 1970 too: a NULL ts read as its 0.0 would then be "within a year")
        at = (
            draw(st.sampled_from([NOW, 1000.0]))
            + draw(st.integers(0, 10**6)) / 1000
            + draw(st.sampled_from([0.0, 0.0005]))
        )
        ts = draw(st.sampled_from([None, at - 2.5, at - 2 * 365 * 86400, float("inf"), -0.0, 12.3456785]))
        text = '{"v":1}' if many else draw(data_text)
        rows.append((device, seqs[device] * 3 + draw(st.integers(0, 2)), ts, at, text))
        seqs[device] += 1
    return rows


def both(path: Path, after: int = 0, limit: int = 100_000) -> tuple[Batch | None, Batch | None]:
    columns, rows = StoreLog(path), StoreLog(path, columnar=False)
    assert columns.columnar and columns.open() and rows.open()
    try:
        return read_column_batch(columns, after, limit, REGISTRY), read_batch(rows, after, limit, REGISTRY)
    finally:
        columns.close()
        rows.close()


def test_the_reader_uses_the_libsqlite3_python_has_loaded() -> None:
    """Two SQLite copies in one process do not share POSIX locks: the C reader must dlopen the
    library Python's sqlite3 already mapped, so one libsqlite3 file is mapped, before and after."""

    def mapped() -> set[str]:
        with open("/proc/self/maps") as fh:
            return {line.split()[-1] for line in fh if "libsqlite3" in line}

    before = mapped()
    assert len(before) == 1
    assert store_source._columnar() is not None
    assert mapped() == before == {store_source._sqlite_library()}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stored_rows(), st.integers(0, 5), st.integers(1, 800))
def test_columns_are_the_rows_python_reads(rows: list, after: int, limit: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.sqlite3"
        make_store(path, rows)
        columnar, python = both(path, after, limit)
        if python is None:
            assert columnar is None
            return
        assert isinstance(columnar, ColumnBatch) and not isinstance(python, ColumnBatch)
        cols = columnar.cols
        assert cols.tuples() == list(python.raw)
        assert (columnar.count, columnar.first, columnar.last) == (python.count, python.first, python.last)
        assert list(columnar.contexts) == list(python.contexts)  # each device once, first seen first
        assert dict(zip(cols.devices, cols.counts, strict=True)) == Counter(r[1] for r in python.raw)
        assert cols.ts_nulls == sum(r[3] is None for r in python.raw)
        assert columnar.unknown == python.unknown
        # what the sinks make of it: the same /write body, the same Arrow table
        assert vmsink.batch_body(columnar) == vmsink.batch_body(python)
        assert lake._table(columnar).equals(lake._table(python))


def test_the_odd_rows_go_through_python_in_the_c_formatter_too() -> None:
    rows = [(DEVICE_IDS[i % 6], i, NOW - i, NOW + i / 1000, t) for i, t in enumerate(COMMON + ODD)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.sqlite3"
        make_store(path, rows)
        columnar, python = both(path)
        assert isinstance(columnar, ColumnBatch) and python is not None
        calls: list[tuple] = []

        def fallback(raw: tuple, prefixes: dict[str, str]) -> tuple[str, int]:
            calls.append(raw)
            return vmsink.raw_line(raw, prefixes)

        prefixes = {d: vmsink._prefix(d, ctx) for d, ctx in columnar.contexts.items()}
        body = vmsink.format_columns(columnar.cols, list(prefixes.values()), prefixes, fallback)
        assert body == vmsink.batch_body(python)
        assert calls == [r for r in python.raw if r[5] in ODD]  # the row rebuilt as the store's tuple


@pytest.mark.parametrize(
    ("column", "value", "kind"),
    [
        ("seq", "'seven'", "TEXT"),  # (column affinity would make '7' an INTEGER)
        ("ts", "'soon'", "TEXT"),
        ("received_at", "x'00'", "BLOB"),
        ("data", "x'7b7d'", "BLOB"),
        ("device_id", "x'61'", "BLOB"),
    ],
)
def test_a_row_not_of_the_store_types_is_named_and_read_by_python(column: str, value: str, kind: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.sqlite3"
        make_store(path, [("a", i, NOW, NOW, '{"v":1}') for i in range(5)])
        db = sqlite3.connect(path, isolation_level=None)
        db.execute(f"UPDATE messages SET {column} = {value} WHERE rowid = 3")  # noqa: S608 -- test constants
        db.close()
        log = StoreLog(path)
        assert log.open()
        with pytest.raises(ValueError, match=f"store row 3: column {column} is {kind}"):
            log.read_columns(0, 10)
        assert log.read_columns(3, 10) is not None  # the rows after it are fine
        batch = read_column_batch(log, 0, 10, REGISTRY)  # the batch holding it: read by Python
        assert batch is not None and not isinstance(batch, ColumnBatch) and batch.count == 5
        assert list(batch.raw) == log.read(0, 10)
        log.close()


def test_text_that_is_not_utf8_fails_as_python_sqlite3_fails() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.sqlite3"
        make_store(path, [("a", i, NOW, NOW, '{"v":1}') for i in range(3)])
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("UPDATE messages SET data = CAST(x'7b22ff227d' AS TEXT) WHERE rowid = 2")
        db.close()
        log = StoreLog(path)
        assert log.open()
        with pytest.raises(UnicodeDecodeError):
            log.read_columns(0, 10)
        with pytest.raises(sqlite3.OperationalError, match="decode"):
            read_column_batch(log, 0, 10, REGISTRY)  # the tail loop counts it as a store_read error
        log.close()


def test_a_reader_sees_whole_commits_while_the_store_writes() -> None:
    """The C reader's statement is reset after each read (no read transaction held between reads:
    the store's checkpoints go on), and each read sees whole commits of 100 rows."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.sqlite3"
        make_store(path, [])
        stop = threading.Event()
        commits = [0]

        def writer() -> None:
            db = sqlite3.connect(path, isolation_level=None)
            seq = 0
            deadline = time.monotonic() + 10
            while not stop.is_set() and commits[0] < 300 and time.monotonic() < deadline:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "INSERT INTO messages VALUES (?,?,?,?,?)",
                    [("w", seq + i, None, NOW, f'{{"v":{i}}}') for i in range(100)],
                )
                db.execute("COMMIT")
                seq += 100
                commits[0] += 1
            db.close()

        thread = threading.Thread(target=writer)
        log = StoreLog(path)
        assert log.open()
        thread.start()
        seen = 0
        try:
            for _ in range(2000):
                cols = log.read_columns(0, 1_000_000)
                if cols is not None:
                    assert cols.count % 100 == 0 and cols.count >= seen
                    seen = cols.count
                if not thread.is_alive():
                    break
        finally:
            stop.set()
            thread.join(20)
        last = log.read_columns(0, 1_000_000)
        assert last is not None and last.count == 100 * commits[0] > 0
        # between reads the reader holds no read transaction: a TRUNCATE checkpoint is not blocked
        db = sqlite3.connect(path, isolation_level=None)
        assert db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone() == (0, 0, 0)
        assert path.with_name(path.name + "-wal").stat().st_size == 0
        db.close()
        log.close()


def test_bad_arguments_get_specific_errors() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.sqlite3"
        make_store(path, [("a", 1, None, NOW, "1")])
        log = StoreLog(path)
        assert log.open()
        with pytest.raises(ValueError, match="limit must be 1..1000000, got 0"):
            log.read_columns(0, 0)
        cols = log.read_columns(0, 5)
        assert cols is not None and cols.tuples() == [(1, "a", 1, None, NOW, "1")]
        assert log.read_columns(1, 5) is None
        log.close()
        reader = store_source._columnar().Reader(str(path))
        reader.close()
        with pytest.raises(ValueError, match="closed"):
            reader.read(0, 1)
        with pytest.raises(sqlite3.OperationalError, match="unable to open"):
            store_source._columnar().Reader(str(Path(tmp) / "missing.sqlite3"))
        with pytest.raises(ValueError, match="column seq is not bytes of 8 bytes"):
            vmsink.format_columns(cols._replace(seq=b""), ["p"], {"a": "p"}, vmsink.raw_line)
        with pytest.raises(ValueError, match="a list of one str per device"):
            vmsink.format_columns(cols, [], {}, vmsink.raw_line)
        with pytest.raises(ValueError, match="out of range"):
            vmsink.format_columns(
                cols._replace(data_offsets=b"\0\0\0\0\x09\0\0\0"), ["p"], {}, vmsink.raw_line
            )
