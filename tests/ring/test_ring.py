"""Ring API on real files: append, read, pop, full, wrap, limits, file checks."""

from __future__ import annotations

import itertools
import os
import struct
import threading
import time
from pathlib import Path

import pytest

from node.ring import (
    ConsumerBusy,
    RecordTooLarge,
    Ring,
    RingClosed,
    RingConfigError,
    RingCorrupt,
    RingError,
    RingFull,
    RingPositionError,
    RingVersionError,
)
from node.ring import descriptor as D

CAP = 1 << 16


def test_open_reports_backend_id_capacity_and_empty_counters(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=CAP, backend=backend) as ring:
        assert ring.backend == backend
        assert len(ring.ring_id) == 16
        assert ring.capacity == CAP
        assert ring.max_record == CAP // 4 - 32
        assert (ring.head, ring.tail, ring.depth, ring.bytes_used) == (0, 0, 0, 0)


def test_appended_records_are_read_in_order_with_positions(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=CAP, backend=backend) as ring:
        assert ring.append(b"one") is True
        assert ring.append_batch([b"two", b"", b"x" * 100]) == 3
        reader = ring.reader()
        recs = reader.read(ring.head)
        assert [r.payload for r in recs] == [b"one", b"two", b"", b"x" * 100]
        assert recs[0].pos == 0
        for a, b in itertools.pairwise(recs):
            assert a.end == b.pos
        assert recs[-1].end == ring.tail
        assert ring.depth == 4
        assert ring.bytes_used == ring.tail


def test_read_does_not_remove_and_pop_releases_only_up_to_position(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=CAP, backend=backend) as ring:
        ring.append_batch([b"a", b"b", b"c"])
        reader = ring.reader()
        recs = reader.read(ring.head)
        assert [r.payload for r in reader.read(ring.head)] == [b"a", b"b", b"c"]
        assert reader.pop(recs[1].end) == 2
        assert ring.head == recs[1].end
        assert ring.depth == 1
        assert [r.payload for r in reader.read(ring.head)] == [b"c"]


def test_pops_survive_reopen(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=CAP, backend=backend) as ring:
        ring.append_batch([b"a", b"b", b"c"])
        reader = ring.reader()
        reader.pop(reader.read(ring.head)[0].end)
        ring_id = ring.ring_id
    with Ring.open(ring_path, capacity=CAP, backend=backend) as ring:
        assert ring.recovered
        assert ring.ring_id == ring_id
        assert [r.payload for r in ring.reader().read(ring.head)] == [b"b", b"c"]
        assert ring.depth == 2


def test_full_ring_returns_zero_and_keeps_records(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=4096, backend=backend) as ring:
        payload = b"p" * 200  # 256 bytes per record: exactly 16 fit
        appended = 0
        for _ in range(100):
            if not ring.append(payload):
                break
            appended += 1
        assert appended == 16
        assert ring.append(payload) is False
        assert ring.append_batch([payload, payload]) == RingFull == 0
        assert ring.depth == 16
        assert ring.bytes_used == 4096
        recs = ring.reader().read(ring.head, max_records=100)
        assert len(recs) == 16 and all(r.payload == payload for r in recs)


def test_batch_appends_the_prefix_that_fits(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=4096, backend=backend) as ring:
        batch = [bytes([i]) * 200 for i in range(20)]
        assert ring.append_batch(batch) == 16
        reader = ring.reader()
        recs = reader.read(ring.head, max_records=100)
        assert [r.payload for r in recs] == batch[:16]
        reader.pop(recs[3].end)
        assert ring.append_batch(batch[16:]) == 4


def test_wraps_around_many_times_with_padding(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=4096, backend=backend) as ring:
        reader = ring.reader()
        expected = 0
        sent = 0
        for _lap in range(300):  # ~60 laps of the 4 KiB ring, odd sizes force padding
            batch = [f"{sent + i}:".encode() + b"z" * ((sent + i) * 37 % 700) for i in range(3)]
            n = ring.append_batch(batch)
            sent += n
            recs = reader.read(ring.head, max_records=100)
            for r in recs:
                assert r.payload.split(b":")[0] == str(expected).encode()
                expected += 1
            if recs:
                reader.pop(recs[-1].end)
        assert sent > 500 and expected == sent
        assert ring.tail > 40 * 4096
        assert ring.depth == 0


def test_records_at_max_size_fit_and_max_plus_one_is_refused_with_sizes(
    ring_path: Path, backend: str
) -> None:
    with Ring.open(ring_path, capacity=4096, backend=backend) as ring:
        big = os.urandom(ring.max_record)
        reader = ring.reader()
        for _ in range(10):  # every alignment of the wrap point
            assert ring.append(big)
            ring.append(b"s" * 40)
            recs = reader.read(ring.head)
            assert recs[0].payload == big
            reader.pop(recs[-1].end)
        with pytest.raises(RecordTooLarge) as exc:
            ring.append(big + b"!")
        assert exc.value.size == ring.max_record + 1 and exc.value.max_record == ring.max_record
        assert str(ring.max_record + 1) in str(exc.value) and str(ring.max_record) in str(exc.value)
        with pytest.raises(RecordTooLarge) as exc2:
            ring.append_batch([b"ok", big + b"!"])
        assert exc2.value.index == 1
        assert isinstance(exc2.value, ValueError) and isinstance(exc2.value, RingError)
        assert ring.depth == 0


def test_second_consumer_is_refused_naming_the_lock(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=CAP, backend=backend) as ring:
        reader = ring.reader()
        with Ring.open(ring_path, capacity=CAP, backend=backend) as other:
            with pytest.raises(ConsumerBusy) as exc:
                other.reader()
            assert str(ring_path) + ".consumer" in str(exc.value)
        reader.close()
        ring.reader().close()  # free again once the first one closed


def test_wrong_version_is_refused_naming_both_versions(ring_path: Path) -> None:
    Ring.open(ring_path, capacity=CAP, backend="mmap").close()
    with open(ring_path, "r+b") as fh:
        fh.seek(D.VERSION_OFFSET)
        fh.write(struct.pack("<I", 7))
    with pytest.raises(RingVersionError) as exc:
        Ring.open(ring_path, capacity=CAP, backend="mmap")
    assert exc.value.found == 7 and exc.value.expected == D.VERSION
    assert "version 7" in str(exc.value) and f"version {D.VERSION}" in str(exc.value)


def test_foreign_file_is_refused_as_not_a_ring(ring_path: Path) -> None:
    ring_path.write_bytes(b"SQLite format 3\x00" + b"\x00" * 8000)
    with pytest.raises(RingCorrupt, match="not a ring file"):
        Ring.open(ring_path, capacity=CAP, backend="mmap")


def test_truncated_file_is_refused_with_sizes(ring_path: Path) -> None:
    Ring.open(ring_path, capacity=CAP, backend="mmap").close()
    os.truncate(ring_path, D.file_size(CAP) - 4096)
    with pytest.raises(RingCorrupt, match=str(D.file_size(CAP) - 4096)):
        Ring.open(ring_path, capacity=CAP, backend="mmap")


def test_existing_file_keeps_its_capacity(ring_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Ring.open(ring_path, capacity=CAP, backend="mmap").close()
    with Ring.open(ring_path, capacity=CAP * 4, backend="mmap") as ring:
        assert ring.capacity == CAP
    assert "requested" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"capacity": 5000}, "capacity"),
        ({"capacity": 1024}, "capacity"),
        ({"durability": "disk"}, "durability"),
        ({"backend": "nvme"}, "backend"),
    ],
)
def test_bad_open_arguments_raise_naming_the_value(
    ring_path: Path, kwargs: dict[str, object], name: str
) -> None:
    with pytest.raises(RingConfigError) as exc:
        Ring.open(ring_path, **kwargs)  # type: ignore[arg-type]
    assert exc.value.name == name and repr(kwargs[name]) in str(exc.value)
    assert not ring_path.exists()


def test_positions_below_head_or_unread_are_refused(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=CAP, backend=backend) as ring:
        ring.append_batch([b"a", b"b"])
        reader = ring.reader()
        recs = reader.read(ring.head, max_records=1)
        with pytest.raises(RingPositionError, match="beyond"):
            reader.pop(ring.tail)
        reader.pop(recs[0].end)
        with pytest.raises(RingPositionError, match="below the ring head"):
            reader.read(0)
        with pytest.raises(RingPositionError, match="record boundary"):
            reader.read(recs[0].end + 8)


def test_closed_ring_refuses_use(ring_path: Path) -> None:
    ring = Ring.open(ring_path, capacity=CAP, backend="mmap")
    reader = ring.reader()
    ring.close()
    with pytest.raises(RingClosed):
        ring.append(b"x")
    with pytest.raises(RingClosed):
        reader.read()
    ring.close()  # idempotent


def test_wait_times_out_on_idle_ring_and_wakes_on_commit(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=CAP, backend=backend) as ring:
        reader = ring.reader()
        t0 = time.monotonic()
        assert reader.wait(0.05) is False
        assert 0.045 <= time.monotonic() - t0 < 1.0
        woke: list[float] = []

        def consumer() -> None:
            if reader.wait(5.0):
                woke.append(time.monotonic())

        th = threading.Thread(target=consumer)
        th.start()
        time.sleep(0.05)
        sent = time.monotonic()
        ring.append(b"wake")
        th.join(5)
        assert woke and woke[0] - sent < 0.5
        assert [r.payload for r in reader.read()] == [b"wake"]
        assert reader.wait(0.01) is False  # nothing past what was read


def test_process_durability_appends_without_persist(ring_path: Path) -> None:
    with Ring.open(ring_path, capacity=CAP, durability="process", backend="mmap") as ring:
        assert ring.append_batch([b"a", b"b"]) == 2
        assert ring.durability == "process"
    with Ring.open(ring_path, capacity=CAP, backend="mmap") as ring:
        assert [r.payload for r in ring.reader().read(ring.head)] == [b"a", b"b"]


def test_max_bytes_limits_a_read_but_returns_at_least_one(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=CAP, backend=backend) as ring:
        ring.append_batch([b"1" * 100, b"2" * 100, b"3" * 100])
        reader = ring.reader()
        assert [len(r.payload) for r in reader.read(ring.head, max_bytes=10)] == [100]
        assert len(reader.read(ring.head, max_bytes=250)) == 2
        assert len(reader.read(ring.head, max_records=1)) == 1


def test_auto_backend_falls_back_to_mmap_where_libpmem_is_missing(
    ring_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import node.ring.backend as backend_module
    from node.ring import RingBackendError

    # The state load_libpmem() leaves when dlopen("libpmem.so.1") fails.
    monkeypatch.setattr(backend_module, "_libpmem", None)
    monkeypatch.setattr(backend_module, "_libpmem_error", "libpmem.so.1: cannot open shared object file")
    with Ring.open(ring_path, capacity=CAP) as ring:
        assert ring.backend == "mmap"
        assert ring.append(b"no pmem")
    with pytest.raises(RingBackendError, match="libpmem.so.1"):
        Ring.open(ring_path, capacity=CAP, backend="msync")


def test_missing_directory_is_refused_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "x.ring"
    with pytest.raises(RingConfigError) as exc:
        Ring.open(path, capacity=CAP)
    assert exc.value.name == "path" and str(path) in str(exc.value)


def test_checksum_is_standard_crc32c() -> None:
    from node.ring._native import lib

    # The CRC32C check value (RFC 3720 / iSCSI): files stay readable on CPUs with and
    # without SSE4.2, which use different code paths.
    assert lib.iotring_crc32c(0, b"123456789", 9) == 0xE3069283
    assert lib.iotring_crc32c(0, b"", 0) == 0

    def reference(data: bytes) -> int:  # bitwise CRC32C (Castagnoli, reflected 0x82F63B78)
        crc = 0xFFFFFFFF
        for byte in data:
            crc ^= byte
            for _ in range(8):
                crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        return crc ^ 0xFFFFFFFF

    data = bytes(range(256)) * 5
    for start, end in ((0, 1), (1, 8), (3, 70), (5, 1280)):
        assert lib.iotring_crc32c(0, data[start:end], end - start) == reference(data[start:end])
    whole = lib.iotring_crc32c(0, data, len(data))
    assert lib.iotring_crc32c(lib.iotring_crc32c(0, data[:333], 333), data[333:], len(data) - 333) == whole


def test_close_releases_a_wait_blocked_in_another_thread(ring_path: Path, backend: str) -> None:
    ring = Ring.open(ring_path, capacity=CAP, backend=backend)
    reader = ring.reader()
    result: list[bool] = []
    th = threading.Thread(target=lambda: result.append(reader.wait(30.0)))
    th.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    ring.close()  # must not unmap under the waiting thread
    th.join(5)
    assert not th.is_alive() and result == [False]
    assert time.monotonic() - t0 < 2.5


def test_doorbell_thread_wait_while_owner_reads_and_pops(ring_path: Path, backend: str) -> None:
    # The monitor/publisher pattern: one thread blocks in wait(), the owner reads and pops.
    with Ring.open(ring_path, capacity=4096, backend=backend) as ring:
        reader = ring.reader()
        rings = threading.Event()
        stop = threading.Event()

        def doorbell() -> None:
            for _ in range(100_000):
                if stop.is_set():
                    return
                if reader.wait(0.01):
                    rings.set()
                    time.sleep(0.0005)

        th = threading.Thread(target=doorbell)
        th.start()
        got = []
        try:
            for i in range(300):
                while not ring.append(b"%d" % i):
                    recs = reader.read()
                    got += [int(r.payload) for r in recs]
                    if recs:
                        reader.pop(recs[-1].end)
            for _ in range(1000):
                recs = reader.read()
                if not recs:
                    break
                got += [int(r.payload) for r in recs]
                reader.pop(recs[-1].end)
        finally:
            stop.set()
            th.join(5)
        assert got == list(range(300))
        assert rings.is_set()


def test_read_from_inside_a_record_or_past_the_tail_is_a_position_error(
    ring_path: Path, backend: str
) -> None:
    with Ring.open(ring_path, capacity=CAP, backend=backend) as ring:
        ring.append_batch([b"a" * 200, b"b"])
        reader = ring.reader()
        first = reader.read(ring.head, max_records=1)[0]
        with pytest.raises(RingPositionError, match="no record starts there"):
            reader.read(first.pos + 64)  # aligned, but inside the first record
        with pytest.raises(RingPositionError, match="beyond the ring tail"):
            reader.read(ring.tail + 32)
        assert reader.read(ring.tail) == []
        assert [r.payload for r in reader.read(first.end)] == [b"b"]


def test_replaying_older_records_does_not_rearm_wait(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=CAP, backend=backend) as ring:
        ring.append_batch([b"1", b"2", b"3"])
        reader = ring.reader()
        assert len(reader.read(ring.head)) == 3
        assert [r.payload for r in reader.read(ring.head, max_records=1)] == [b"1"]  # a replay
        assert reader.wait(0.02) is False  # nothing new past what was read
        assert reader.read() == []  # default start: after the furthest read


def test_append_packed_appends_a_caller_built_buffer(ring_path: Path, backend: str) -> None:
    from array import array

    with Ring.open(ring_path, capacity=4096, backend=backend) as ring:
        payloads = [b"a" * 10, b"", b"c" * 300]
        assert ring.append_packed(b"".join(payloads), array("I", map(len, payloads))) == 3
        assert [r.payload for r in ring.reader().read()] == payloads
        with pytest.raises(RingConfigError, match="add up"):
            ring.append_packed(b"abc", array("I", [1, 1]))
        with pytest.raises(RingConfigError, match="array"):
            ring.append_packed(b"ab", [1, 1])  # type: ignore[arg-type]
        with pytest.raises(RecordTooLarge) as exc:
            ring.append_packed(b"x" * 2000, array("I", [1000, 1000]))
        assert exc.value.index == 0 and exc.value.size == 1000
        big = array("I", [200] * 40)  # 40 records of 256 B do not fit: a prefix does
        free = 4096 - ring.bytes_used
        assert ring.append_packed(b"z" * 8000, big) == free // 256 == 14
        assert ring.depth == 3 + 14


def test_a_read_from_the_popped_position_goes_on_when_the_pop_also_released_wrap_padding(
    ring_path: Path, backend: str
) -> None:
    """A pop releases the wrap padding after it once the reader has scanned it (it stops
    at the record claimed after the padding); reading from the popped-to position then
    starts at the head instead of refusing it (it once raised RingPositionError)."""
    with Ring.open(ring_path, capacity=4096, backend=backend) as ring:
        reader = ring.reader()
        assert ring.append_batch([b"a" * 990, b"b" * 990, b"c" * 990, b"d" * 800]) == 4
        recs = reader.read()
        cursor = recs[-1].end
        assert 4096 - cursor < 200  # the next 200-byte record does not fit: padding first
        reader.pop(recs[0].end)  # room for the claim
        with Ring.open(ring_path, capacity=4096, backend=backend) as producer:
            assert producer._append_partial([b"e" * 200], 0) == 1  # a live producer's claim
            assert reader.read() == []  # scans the padding, stops at the claim
            reader.pop(cursor)
            assert ring.head == 4096  # the padding went with the pop
            assert reader.read(cursor) == []  # from the popped-to position: no error
            with pytest.raises(RingPositionError, match="below the ring head"):
                reader.read(recs[0].end)  # records were popped there: still refused
