"""The append fast paths: checksums of three records at a time, the list-of-bytes
hand-off (``node/ring/_gather.c``), non-temporal payload stores on pmem.

Every check reads what is really in the ring file and compares it with a bitwise
CRC32C reference, so the optimised C paths cannot drift from the file format.
"""

from __future__ import annotations

import itertools
from array import array
from pathlib import Path

import pytest

from node.ring import RecordTooLarge, Ring
from node.ring import descriptor as D
from node.ring._native import APPEND_IOV, append_list

# Lengths around the 8-byte word and 64-byte cache-line edges, 0 included.
EDGE_LENGTHS = (0, 1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 95, 96, 127, 128, 129, 255, 256, 257, 1000, 4097)


def crc32c_reference(data: bytes, crc: int = 0) -> int:
    """Bitwise CRC32C (Castagnoli, reflected 0x82F63B78), chainable like iotring_crc32c."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def stored_records(ring: Ring) -> list[tuple[bytes, bytes]]:
    """(header, payload) of every un-popped data record, read from the file itself."""
    image = Path(ring.path).read_bytes()
    out = []
    for rec in ring.reader().read(max_records=100_000, max_bytes=1 << 30):
        off = D.record_offset(rec.pos, ring.capacity)
        header = image[off : off + D.RECORD_HEADER_LENGTH]
        (length,) = array("I", header[D.REC_LENGTH_OFFSET : D.REC_LENGTH_OFFSET + 4])
        out.append((header, image[off + D.RECORD_HEADER_LENGTH : off + D.RECORD_HEADER_LENGTH + length]))
    return out


def expected_crc(ring: Ring, header: bytes, payload: bytes) -> int:
    seed = crc32c_reference(ring.ring_id)
    covered = header[: D.REC_STATE_OFFSET] + header[D.REC_PID_OFFSET :] + payload
    return crc32c_reference(covered, seed)


def payload_for(length: int, salt: int) -> bytes:
    return bytes((salt * 31 + i * 7) & 0xFF for i in range(length))


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 5, 7])
def test_stored_checksums_match_a_bitwise_crc32c_of_header_and_payload(
    ring_path: Path, backend: str, batch_size: int
) -> None:
    # Batches of 1..7 records: 3-lane groups, 1- and 2-record remainders, lanes of
    # unequal length (the common prefix, then each lane alone).
    lengths = list(EDGE_LENGTHS)
    payloads = [payload_for(n, i) for i, n in enumerate(lengths)]
    with Ring.open(ring_path, capacity=1 << 16, backend=backend) as ring:
        for start in range(0, len(payloads), batch_size):
            chunk = payloads[start : start + batch_size]
            assert ring.append_batch(chunk) == len(chunk)
        records = stored_records(ring)
        assert [p for _, p in records] == payloads
        for header, payload in records:
            (crc,) = array("I", header[D.REC_CRC_OFFSET : D.REC_CRC_OFFSET + 4])
            assert crc == expected_crc(ring, header, payload), (len(payload), hex(crc))


def test_single_appends_and_packed_batches_store_the_same_checksums(ring_path: Path, backend: str) -> None:
    payloads = [payload_for(n, n) for n in EDGE_LENGTHS]
    with Ring.open(ring_path, capacity=1 << 16, backend=backend) as ring:
        for p in payloads:
            assert ring.append(p)
        assert ring.append_packed(b"".join(payloads), array("I", map(len, payloads))) == len(payloads)
        records = stored_records(ring)
        assert [p for _, p in records] == payloads * 2
        for header, payload in records:
            (crc,) = array("I", header[D.REC_CRC_OFFSET : D.REC_CRC_OFFSET + 4])
            assert crc == expected_crc(ring, header, payload)


def test_batches_round_trip_across_many_wraps_with_edge_lengths(ring_path: Path, backend: str) -> None:
    # A 16 KiB ring wrapped ~14 times by batches whose records straddle cache lines
    # and the wrap point (padding inside a batch); every payload read back intact.
    lengths = itertools.cycle(EDGE_LENGTHS[:-2] + (300, 700))
    sent = 0
    with Ring.open(ring_path, capacity=1 << 14, backend=backend) as ring:
        reader = ring.reader()
        for round_no in range(400):
            batch = [payload_for(next(lengths), round_no * 8 + j) for j in range(1 + round_no % 6)]
            done = ring.append_batch(batch)
            assert done >= 1
            got = reader.read(max_records=100, max_bytes=1 << 20)
            assert [r.payload for r in got] == batch[:done]
            reader.pop(got[-1].end)
            sent += len(batch)
            if done < len(batch):  # the rest did not fit before the pop
                rest = batch[done:]
                assert ring.append_batch(rest) == len(rest)
                again = reader.read()
                assert [r.payload for r in again] == rest
                reader.pop(again[-1].end)
        assert ring.tail > 10 * ring.capacity and ring.depth == 0
        assert sent == sum(1 + r % 6 for r in range(400))


def test_lists_tuples_and_other_buffers_append_the_same_records(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=1 << 16, backend=backend) as ring:
        as_list = [b"a" * 70, b"", b"b" * 130]
        as_tuple = (b"c" * 5, b"d" * 64)
        mixed = [b"e" * 9, bytearray(b"f" * 66), memoryview(b"g" * 3)]  # not all bytes: general path
        assert ring.append_batch(as_list) == 3
        assert ring.append_batch(as_tuple) == 2
        assert ring.append_batch(mixed) == 3  # type: ignore[arg-type]
        assert ring.append_batch([]) == 0 and ring.append_batch(()) == 0
        got = [r.payload for r in ring.reader().read()]
        assert got == [*as_list, *as_tuple, b"e" * 9, b"f" * 66, b"g" * 3]
        assert ring.depth == 8


def test_too_large_item_in_a_list_names_its_index_and_appends_nothing(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=1 << 14, backend=backend) as ring:
        batch = [b"ok", b"fine", b"x" * (ring.max_record + 1), b"late"]
        with pytest.raises(RecordTooLarge) as exc:
            ring.append_batch(batch)
        assert exc.value.index == 2 and exc.value.size == ring.max_record + 1
        assert ring.depth == 0 and ring.tail == 0


def test_full_ring_takes_the_prefix_of_a_list_that_fits(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=4096, backend=backend) as ring:
        batch = [bytes([i]) * 224 for i in range(40)]  # 256 B records: 16 fit
        assert ring.append_batch(batch) == 16
        assert ring.append_batch(batch) == 0
        assert [r.payload for r in ring.reader().read(max_records=100)] == batch[:16]


def test_gather_refuses_null_addresses_and_bad_arity_with_values() -> None:
    with pytest.raises(ValueError, match="non-null"):
        append_list(APPEND_IOV, 0, [b"x"], 0)
    with pytest.raises(TypeError, match="expected 4 arguments, got 2"):
        append_list(APPEND_IOV, 1)


def test_lists_longer_than_the_stack_buffer_and_from_several_threads(ring_path: Path, backend: str) -> None:
    import threading

    # 300 items take _gather's heap path; four threads append lists at once while a
    # fifth keeps replacing the items of a list being appended (its old items must
    # stay alive until the C call returns: every record is one whole version).
    shared = [b"v0" * 40] * 50
    stop = threading.Event()

    def mutate() -> None:
        for version in range(1, 2000):
            if stop.is_set():
                return
            for i in range(len(shared)):
                shared[i] = (b"v%d" % version) * 40

    def produce(tag: int) -> None:
        for round_no in range(40):
            assert ring.append_batch([b"%d-%d-%d" % (tag, round_no, j) for j in range(25)]) == 25
            assert ring.append_batch(shared) == 50

    with Ring.open(ring_path, capacity=1 << 22, backend=backend) as ring:
        long_list = [bytes([i % 251]) * (i % 97) for i in range(300)]
        assert ring.append_batch(long_list) == 300
        mutator = threading.Thread(target=mutate)
        mutator.start()
        producers = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
        for t in producers:
            t.start()
        for t in producers:
            t.join(timeout=60)
        stop.set()
        mutator.join(timeout=60)
        got = [r.payload for r in ring.reader().read(max_records=100_000, max_bytes=1 << 30)]
        assert got[:300] == long_list
        rest = got[300:]
        assert len(rest) == 4 * 40 * 75
        tagged = [p for p in rest if not p.startswith(b"v")]
        for tag in range(4):  # per-thread order is ring order
            mine = [p for p in tagged if p.startswith(b"%d-" % tag)]
            assert mine == [b"%d-%d-%d" % (tag, r, j) for r in range(40) for j in range(25)]
        versions = [p for p in rest if p.startswith(b"v")]
        assert len(versions) == 4 * 40 * 50
        assert all(p == p[: len(p) // 40] * 40 for p in versions)  # never a torn mix
