"""Recovery at open: damaged bytes on disk are never delivered, everything else is."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from node.ring import Ring, RingCorrupt
from node.ring import descriptor as D

CAP = 1 << 14


def _fill(path: Path, backend: str, payloads: list[bytes]) -> list[int]:
    with Ring.open(path, capacity=CAP, backend=backend) as ring:
        assert ring.append_batch(payloads) == len(payloads)
        return [r.pos for r in ring.reader().read(ring.head, max_records=1000)]


def _read_all(path: Path, backend: str) -> tuple[list[bytes], Ring]:
    ring = Ring.open(path, capacity=CAP, backend=backend)
    return [r.payload for r in ring.reader().read(ring.head, max_records=1000)], ring


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


PAYLOADS = [bytes([65 + i]) * (20 + 30 * i) for i in range(8)]


def test_flipped_payload_byte_is_never_delivered(ring_path: Path, backend: str) -> None:
    positions = _fill(ring_path, backend, PAYLOADS)
    off = D.payload_offset(positions[3], CAP) + 5
    with open(ring_path, "r+b") as fh:
        fh.seek(off)
        byte = fh.read(1)
        fh.seek(off)
        fh.write(bytes([byte[0] ^ 0x01]))
    got, ring = _read_all(ring_path, backend)
    with ring:
        assert ring.recovered
        assert got == PAYLOADS[:3] + PAYLOADS[4:]
        assert ring.depth == len(PAYLOADS) - 1


def test_damaged_header_is_skipped_to_the_next_valid_record(ring_path: Path, backend: str) -> None:
    positions = _fill(ring_path, backend, PAYLOADS)
    _poke(ring_path, D.record_offset(positions[2], CAP) + D.REC_LENGTH_OFFSET, struct.pack("<I", 7777))
    _poke(ring_path, D.record_offset(positions[5], CAP) + D.REC_POS_OFFSET, struct.pack("<Q", 123456))
    got, ring = _read_all(ring_path, backend)
    with ring:
        assert got == [PAYLOADS[i] for i in (0, 1, 3, 4, 6, 7)]
        # appending after the repaired region works and is read after it
        assert ring.append(b"after")
        assert [r.payload for r in ring.reader().read(ring.head, max_records=1000)][-1] == b"after"


def test_torn_last_record_after_power_loss_is_dropped_and_earlier_kept(ring_path: Path, backend: str) -> None:
    # Power loss while the last append was being persisted: its header reached the
    # media but not all of its payload.  Emulated with an image taken before it.
    _fill(ring_path, backend, PAYLOADS[:4])
    before = ring_path.with_suffix(".before")
    shutil.copyfile(ring_path, before)
    with Ring.open(ring_path, capacity=CAP, backend=backend) as ring:
        tail = ring.tail
        assert ring.append(b"L" * 300)
    new = ring_path.read_bytes()
    old = bytearray(before.read_bytes())
    start = D.record_offset(tail, CAP)
    old[start : start + 64 + 100] = new[start : start + 64 + 100]  # header + part of the payload
    ring_path.write_bytes(bytes(old))
    got, ring = _read_all(ring_path, backend)
    with ring:
        assert got == PAYLOADS[:4]
        assert ring.tail == tail  # the torn region is free again


def test_garbage_after_the_tail_is_ignored(ring_path: Path, backend: str) -> None:
    positions = _fill(ring_path, backend, PAYLOADS[:3])
    end = positions[-1] + D.aligned_record_size(len(PAYLOADS[2]))
    _poke(ring_path, D.record_offset(end, CAP), b"\xff" * 512)
    got, ring = _read_all(ring_path, backend)
    with ring:
        assert got == PAYLOADS[:3]
        assert ring.tail == end


def test_recovery_after_wrap_keeps_records_across_the_wrap_point(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=4096, backend=backend) as ring:
        reader = ring.reader()
        for _ in range(40):  # move the head near the end of the buffer
            ring.append(b"w" * 90)
            reader.pop(reader.read()[-1].end)
        assert ring.append_batch([b"x" * 500, b"y" * 700, b"z" * 900]) == 3
    with Ring.open(ring_path, capacity=4096, backend=backend) as ring:
        assert ring.recovered
        assert [r.payload for r in ring.reader().read()] == [b"x" * 500, b"y" * 700, b"z" * 900]


def test_live_corruption_is_skipped_and_counted(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=CAP, backend=backend) as ring:
        ring.append_batch([b"a" * 100, b"b" * 100, b"c" * 100])
        reader = ring.reader()
        pos = reader.read(ring.head, max_records=2)[1].pos
        _poke(ring_path, D.payload_offset(pos, CAP) + 10, b"!")  # shared page cache: visible live
        assert [r.payload for r in reader.read(ring.head)] == [b"a" * 100, b"c" * 100]
        assert reader.skipped_corrupt == 1
        assert ring.depth == 2


def test_second_opener_does_not_recover_a_ring_in_use(ring_path: Path, backend: str) -> None:
    with Ring.open(ring_path, capacity=CAP, backend=backend) as first:
        assert first.recovered
        with Ring.open(ring_path, capacity=CAP, backend=backend) as second:
            assert not second.recovered
            assert second.ring_id == first.ring_id
            second.append(b"from second")
        assert [r.payload for r in first.reader().read()] == [b"from second"]


def test_misaligned_head_is_refused_as_corrupt(ring_path: Path) -> None:
    _fill(ring_path, "mmap", PAYLOADS[:2])
    _poke(ring_path, D.HEAD_OFFSET, struct.pack("<Q", 17))
    with pytest.raises(RingCorrupt, match="head 17"):
        Ring.open(ring_path, capacity=CAP, backend="mmap")
