"""The ring's pages in the page cache: one page per folio, so a small persist writes a page.

On Linux >= 6.16 ext4 caches file data in large folios (up to 2 MiB) when it reads
ahead, and a folio is dirtied and written back whole.  A ring file read sequentially
(the recovery scan, a backup, a ``cp``) ended up in large folios, and from then on
every one-record persist wrote up to 2 MiB (measured: 2,048 KiB per append instead
of 4; 2.6 GB/s of disk writes from a node at 5,000 msg/s).  docs/ring.md, "Page cache".
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from node.record import pack_record
from node.ring import Ring

CAPACITY = 64 << 20  # large enough for the readahead to reach 2 MiB folios
RECORD = pack_record("device-0001", 1, 1.0, 1.0, {"v": "x" * 60})


def _write_bytes() -> int:
    """Bytes this process has caused to be written to storage (pages it dirtied)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no write_bytes in /proc/self/io")


def _mappings_of(path: Path) -> list[dict[str, str]]:
    """The /proc/self/smaps fields of each of this process's mappings of ``path``."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.endswith(str(path)):
            fields: dict[str, str] = {}
            for entry in lines[i + 1 :]:
                key, sep, value = entry.partition(":")
                if not sep or " " in key:  # the next mapping's header line
                    break
                fields[key] = value.strip()
            found.append(fields)
    assert found, f"{path} is not mapped by this process"
    return found


def _smaps_of(path: Path) -> dict[str, str]:
    (fields,) = _mappings_of(path)
    return fields


def _leave_large_folios(path: Path) -> int:
    """Read the file as a backup would (plain readahead) and return how many bytes of it
    a fresh mapping then sees in PMD-sized (2 MiB) folios: the state an earlier run's
    recovery scan left behind."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 1 << 20):
            pass
        mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        for off in range(0, len(mm), mmap.PAGESIZE):
            mm[off]
        return int(_smaps_of(path)["FilePmdMapped"].split()[0]) * 1024
    finally:
        mm.close()


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="no per-process I/O accounting")
@pytest.mark.parametrize("backend", ["msync", "mmap"])
def test_small_appends_write_pages_not_folios(tmp_path: Path, backend: str) -> None:
    from node.ring.backend import load_libpmem

    if backend == "msync" and load_libpmem() is None:
        pytest.skip("libpmem not installed")
    path = tmp_path / "pc.ring"
    Ring.open(path, capacity=CAPACITY, backend=backend).close()
    if _leave_large_folios(path) == 0:
        pytest.skip("this kernel/file system caches the ring in single pages anyway")
    ring = Ring.open(path, backend=backend)  # exclusive: recovers, and resets the cache
    try:
        reader = ring.reader()
        pos = ring.head
        for _ in range(300):  # move the tail deep into the file (where the folios were 2 MiB)
            ring.append_batch([RECORD] * 512)
            batch = reader.read(pos, max_records=65536, max_bytes=64 << 20)
            pos = batch[-1].end
            reader.pop(pos)
        assert ring.tail > CAPACITY // 3
        appends = 500
        before = _write_bytes()
        for i in range(appends):
            ring.append_batch([RECORD])
            if i % 50 == 49:
                batch = reader.read(pos, max_records=65536, max_bytes=64 << 20)
                pos = batch[-1].end
                reader.pop(pos)
        per_append = (_write_bytes() - before) / appends
        # a page or two per persist (record + header page, plus the pops); 2 MiB folios gave 2,048 KiB
        assert per_append < 32 * 1024, f"{per_append / 1024:.1f} KiB written per one-record append"
        assert _smaps_of(path)["FilePmdMapped"] == "0 kB"
    finally:
        ring.close()


@pytest.mark.parametrize("backend", ["msync", "mmap"])
def test_every_mapping_has_no_readahead(tmp_path: Path, backend: str) -> None:
    """Producers and consumers alike (any opener can be the one that faults a page in)."""
    from node.ring.backend import load_libpmem

    if backend == "msync" and load_libpmem() is None:
        pytest.skip("libpmem not installed")
    path = tmp_path / "ra.ring"
    first = Ring.open(path, capacity=1 << 20, backend=backend)
    second = Ring.open(path, backend=backend)  # not exclusive: no recovery, still advised
    try:
        mappings = _mappings_of(path)
        assert len(mappings) == 2
        for fields in mappings:
            flags = fields["VmFlags"].split()
            assert "rr" in flags, f"ring mapping flags {flags}: MADV_RANDOM missing"
        assert not second.recovered
    finally:
        second.close()
        first.close()
