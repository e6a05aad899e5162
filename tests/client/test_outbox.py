"""The device outbox: a real SQLite file, reopened as after a reboot."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgpack
import pytest

from node.client.outbox import Outbox, OutboxError


def test_outbox_keeps_unacked_messages_across_reopen_in_seq_order(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    frames = [(10 + i, msgpack.packb({"seq": 10 + i, "data": i})) for i in range(5)]
    with Outbox(path, first_seq=10) as box:
        box.add(frames[:3])
        box.add(frames[3:])
        assert box.remove_through(11) == 2
    with Outbox(path, first_seq=999) as box:  # first_seq only applies to a new file
        assert list(box.pending()) == frames[2:]
        assert box.next_seq == 15
        assert len(box) == 3


def test_outbox_keeps_frame_type_binary_blob_or_json_text(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    with Outbox(path) as box:
        box.add([(0, b"\x82\xa3seq\x00\xa4data\xc0"), (1, '{"seq":1,"data":null}')])
    with Outbox(path) as box:
        (s0, f0), (s1, f1) = box.pending()
    assert (s0, type(f0)) == (0, bytes)
    assert (s1, f1) == (1, '{"seq":1,"data":null}')


def test_outbox_seq_continues_after_every_message_is_acked(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    with Outbox(path, first_seq=100) as box:
        box.add([(100, b"a"), (101, b"b")])
        box.remove_through(101)
        assert len(box) == 0
    with Outbox(path) as box:
        assert box.next_seq == 102  # never reuse 100/101: the node would dedup them away


def test_outbox_refuses_a_seq_that_goes_back_and_keeps_its_state(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3", first_seq=5) as box:
        box.add([(5, b"a")])
        with pytest.raises(OutboxError, match="expected a seq above 5, got 4"):
            box.add([(4, b"b")])
        with pytest.raises(OutboxError, match="expected a seq above 6, got 5"):
            box.add([(6, b"b"), (5, b"c")])
        assert list(box.pending()) == [(5, b"a")]  # the failed batch left nothing
        assert box.next_seq == 6


def test_outbox_remove_drops_one_refused_message_only(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite3") as box:
        box.add([(0, b"a"), (1, b"b"), (2, b"c")])
        box.remove(1)
        assert [s for s, _ in box.pending()] == [0, 2]


def test_outbox_of_another_device_is_refused_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    Outbox(path, device="sensor-1").close()
    with pytest.raises(OutboxError, match="belongs to device 'sensor-1', not 'sensor-2'"):
        Outbox(path, device="sensor-2")
    Outbox(path).close()  # no device given: no check


def test_outbox_with_another_schema_version_is_refused_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    Outbox(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = 7 WHERE key = 'version'")
    db.commit()
    db.close()
    with pytest.raises(OutboxError, match="schema version 7, expected 1"):
        Outbox(path)


def test_outbox_on_a_file_that_is_not_sqlite_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError, match="cannot open outbox"):
        Outbox(path)


def test_outbox_rejects_bad_arguments_naming_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="got 'OFF'"):
        Outbox(tmp_path / "a", synchronous="OFF")
    with pytest.raises(ValueError, match="got -1"):
        Outbox(tmp_path / "b", first_seq=-1)
