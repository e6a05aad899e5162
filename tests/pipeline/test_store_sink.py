"""SqliteSink: contract 5 schema, dedup, cursor atomic with the data (real SQLite files)."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from node.record import Record
from node.sinks import RecordRejected
from node.sinks.base import SinkError
from node.sinks.sqlite import SqliteSink

RING = b"r" * 16
OTHER = b"o" * 16


@pytest.fixture
def sink(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = SqliteSink(tmp_path / "store.sqlite3")
    s.open()
    yield s
    s.close()


def rows(path: Path) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(path)) as db:
        return db.execute(
            "SELECT device_id, seq, ts, received_at, data FROM messages ORDER BY device_id, seq"
        ).fetchall()


def test_schema_is_contract_5_in_wal_mode(sink: SqliteSink) -> None:
    with closing(sqlite3.connect(sink.path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        cols = [(r[1], r[2], r[3], r[5]) for r in db.execute("PRAGMA table_info(messages)")]
    assert cols == [
        ("device_id", "TEXT", 1, 1),
        ("seq", "INTEGER", 1, 2),
        ("ts", "REAL", 0, 0),
        ("received_at", "REAL", 1, 0),
        ("data", "TEXT", 1, 0),
    ]


def test_unknown_ring_has_no_cursor_and_write_sets_it(sink: SqliteSink) -> None:
    assert sink.cursor(RING) is None
    assert sink.write([Record("a", 1, None, 10.5, {"t": 1})], RING, 64) == 1
    assert sink.cursor(RING) == 64


def test_rows_hold_json_text_and_null_ts(sink: SqliteSink) -> None:
    data = {"temp": 21.5, "tags": ["x", "é"], "nested": {"ok": True, "none": None}}
    sink.write([Record("dev", 0, None, 1.25, data), Record("dev", 1, 7, 1.5, "text")], RING, 96)
    got = rows(sink.path)
    assert got[0][:4] == ("dev", 0, None, 1.25)
    assert json.loads(str(got[0][4])) == data
    assert got[1] == ("dev", 1, 7.0, 1.5, '"text"')


def test_duplicate_device_seq_is_kept_once_and_not_counted(sink: SqliteSink) -> None:
    assert sink.write([Record("a", 1, None, 1.0, 1), Record("b", 1, None, 1.0, 2)], RING, 64) == 2
    assert sink.write([Record("a", 1, None, 2.0, 99), Record("a", 2, None, 2.0, 3)], RING, 128) == 1
    assert [r[:2] for r in rows(sink.path)] == [("a", 1), ("a", 2), ("b", 1)]
    assert rows(sink.path)[0][4] == "1"  # the first copy stays
    assert sink.cursor(RING) == 128


def test_rejected_record_writes_nothing_not_even_the_cursor(sink: SqliteSink) -> None:
    sink.write([Record("a", 1, None, 1.0, 1)], RING, 64)
    with pytest.raises(RecordRejected) as info:
        sink.write([Record("a", 2, None, 1.0, 2), Record("a", 3, None, 1.0, b"\x00bytes")], RING, 192)
    assert info.value.index == 1 and "seq 3" in info.value.reason
    assert sink.cursor(RING) == 64
    assert [r[1] for r in rows(sink.path)] == [1]


def test_non_finite_float_data_is_rejected_with_its_record(sink: SqliteSink) -> None:
    with pytest.raises(RecordRejected, match="device 'nan-dev' seq 4"):
        sink.write([Record("nan-dev", 4, None, 1.0, float("nan"))], RING, 32)


def test_new_ring_replaces_the_cursor_of_the_old_ring(sink: SqliteSink) -> None:
    sink.write([], RING, 4096)
    sink.write([], OTHER, 32)
    assert sink.cursor(OTHER) == 32
    assert sink.cursor(RING) is None


def test_cursor_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    first = SqliteSink(path, durability="process")
    first.open()
    first.write([Record("a", 1, 2.5, 3.5, [1, 2])], RING, 320)
    first.close()
    second = SqliteSink(path)
    second.open()
    assert second.cursor(RING) == 320
    second.close()


def test_use_after_close_and_bad_durability_are_errors(tmp_path: Path) -> None:
    s = SqliteSink(tmp_path / "x.sqlite3")
    with pytest.raises(SinkError, match="before open"):
        s.cursor(RING)
    with pytest.raises(ValueError, match="'fast'"):
        SqliteSink(tmp_path / "y.sqlite3", durability="fast")


def test_unopenable_store_path_names_the_path(tmp_path: Path) -> None:
    s = SqliteSink(tmp_path / "missing-dir" / "store.sqlite3")
    with pytest.raises(SinkError, match="missing-dir"):
        s.open()


@pytest.mark.parametrize(("durability", "level"), [("power", 2), ("process", 1)])
def test_power_durability_commits_data_and_cursor_with_synchronous_full(
    tmp_path: Path, durability: str, level: int
) -> None:
    """Issue 12: in power mode each write (rows and cursor, one transaction) is fsynced at
    COMMIT (synchronous=FULL = 2): a cursor the store confirmed survives a power cut.
    ``process`` mode keeps NORMAL (1): it survives process crashes only, as documented."""
    s = SqliteSink(tmp_path / "store.sqlite3", durability)
    s.open()
    try:
        assert s._conn().execute("PRAGMA synchronous").fetchone()[0] == level
        s.write([Record("d", 1, None, 1.0, {"v": 1})], RING, 64)
        assert s.cursor(RING) == 64
    finally:
        s.close()


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def test_many_devices_write_about_a_kilobyte_per_record_not_a_page(tmp_path: Path) -> None:
    """2,000 devices × 1 msg/s in 20 ms commits: each record lands at its own device's
    place in the PRIMARY KEY index, so every commit dirties one index page per record.
    With 4 KiB pages and the 1000-page checkpoint this wrote ≈ 4.3 KB per record (7-9 KB
    at 10,000 devices); the store's 1 KiB pages and 64 MiB WAL budget write ≈ 1.6 KB.
    Bytes handed to write() (wchar), not time: deterministic on any disk."""
    sink = SqliteSink(tmp_path / "store.sqlite3", "process")
    sink.open()
    devices, seconds, per_commit = 2000, 15, 40
    seqs = [0] * devices
    data = {"temp": 21.5, "hum": 40.5, "battery": 3.7, "status": "ok"}
    before = _wchar()
    n = cursor = 0
    while n < devices * seconds:
        batch = []
        for _ in range(per_commit):
            d = (n * 7919) % devices  # every device once per simulated second, scattered
            batch.append(Record(f"device-{d:05d}", seqs[d], 1.0, 2.0, data))
            seqs[d] += 1
            n += 1
        cursor += 1
        sink.write(batch, RING, cursor)
    per_record = (_wchar() - before) / n
    sink.close()
    with closing(sqlite3.connect(sink.path)) as db:
        assert db.execute("PRAGMA page_size").fetchone()[0] == 1024
        assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == n
    assert per_record < 2500, f"{per_record:.0f} bytes written per record"


def test_an_existing_store_keeps_its_page_size_and_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    with closing(sqlite3.connect(path)) as db:  # a store made before the 1 KiB pages
        db.execute("PRAGMA page_size=4096")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE messages (device_id TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL,"
            " received_at REAL NOT NULL, data TEXT NOT NULL, PRIMARY KEY (device_id, seq))"
        )
        db.execute("INSERT INTO messages VALUES ('old', 0, NULL, 1.0, '{}')")
        db.commit()
    s = SqliteSink(path)
    s.open()
    s.write([Record("new", 0, None, 2.0, {"v": 1})], RING, 1)
    s.close()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA page_size").fetchone()[0] == 4096
    assert [r[0] for r in rows(path)] == ["new", "old"]
