"""One open ring file as both sides of the ring use it: descriptor, mapping, C context.

:class:`~node.ring.ring.Ring` (producers, open and recovery) and
:class:`~node.ring.reader.Reader` (the consumer) share exactly this object and nothing
else; ``ring.py`` imports ``reader.py``, which imports only this module (no cycle).
It knows nothing of appending or reading: it holds the open file, its mapping, the
C helper's context and reads the header counters.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import Any

from node.ring import descriptor as D
from node.ring._native import ffi, lib
from node.ring.backend import PERSIST_NONE, Mapping, open_mapping
from node.ring.errors import RingClosed

log = logging.getLogger("node.ring")


class MappedRing:
    """The mapped file of one open ring (owned by its :class:`~node.ring.ring.Ring`)."""

    path: str
    capacity: int
    max_record: int
    ring_id: bytes
    backend: str
    view: memoryview
    ctx: Any  # cffi "iotring_ctx *"

    def __init__(self, path: str, fd: int, header: D.FileHeader, backend: str) -> None:
        self.path = path
        self.fd = fd
        self.capacity = header.capacity
        self.max_record = header.max_record
        self.ring_id = header.ring_id
        self._map: Mapping | None = open_mapping(path, fd, D.file_size(header.capacity), backend)
        self.backend = self._map.name
        self.view = self._map.view
        ctx = ffi.new("iotring_ctx *")
        ctx.base = self._map.address
        ctx.cap = self.capacity
        ctx.seed = lib.iotring_crc32c(0, self.ring_id, len(self.ring_id))
        ctx.pagesize = mmap.PAGESIZE
        ctx.max_record = self.max_record
        ctx.persist_mode = self._map.persist_mode
        ctx.persist_fn = self._map.persist_fn
        ctx.flush_fn = self._map.flush_fn
        ctx.drain_fn = self._map.drain_fn
        ctx.sim_base = self._map.sim_base
        ctx.sim_size = self._map.size
        ctx.sim_unit = self._map.sim_unit
        ctx.sim_nt = self._map.sim_nt
        self.ctx = ctx
        self.closed = False

    def skip_persist(self) -> None:
        """``durability="process"``: from now on nothing is persisted (page cache only)."""
        self.ctx.persist_mode = PERSIST_NONE

    def load(self, offset: int) -> int:
        """The u64 header word at ``offset`` (acquire load)."""
        if self.closed:
            raise RingClosed(f"{self.path}: ring is closed")
        return int(lib.iotring_load64(self.ctx, offset))

    @property
    def head(self) -> int:
        if self.closed:  # inlined load(): on every read() and pop()
            raise RingClosed(f"{self.path}: ring is closed")
        return int(lib.iotring_load64(self.ctx, D.HEAD_OFFSET))

    @property
    def tail(self) -> int:
        if self.closed:
            raise RingClosed(f"{self.path}: ring is closed")
        return int(lib.iotring_load64(self.ctx, D.TAIL_OFFSET))

    def close(self) -> None:
        """Unmap and close the file (drops its ``LOCK_SH``)."""
        self.closed = True
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


PRELOAD_CHUNK = 1 << 20  # bytes per read while preloading a ring file (reset_page_cache)


def reset_page_cache(fd: int, size: int) -> None:
    """Replace whatever the page cache holds of a ring file with single pages.

    Called by the exclusive opener before it maps the file (no other process has it
    mapped; recovery then scans every page of the lap).  Large folios left by earlier
    readahead (a previous run's recovery scan, a ``cp``, a backup) would make each
    small persist write a whole folio (docs/ring.md, "Page cache").  ``fsync`` first
    (dirty pages cannot be dropped), then ``POSIX_FADV_DONTNEED`` drops the clean,
    unmapped pages, and a read of the whole file with ``POSIX_FADV_RANDOM`` (reads
    exactly what is asked, one page per folio) brings it back in large I/Os, so the
    recovery scan does not fault page by page.  The scan reads the whole file anyway;
    this adds about one sequential read of it (64 MiB: ~50 ms here).
    """
    os.fsync(fd)  # an I/O error here is real: it propagates
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    except OSError as exc:  # advice only: a file system that refuses it keeps its cache as is
        log.warning("ring file page-cache reset skipped (posix_fadvise: %s)", exc)
        return
    buf = bytearray(min(PRELOAD_CHUNK, max(size, 1)))
    off = 0
    while off < size:
        n = os.preadv(fd, [buf], off)
        if n <= 0:
            break
        off += n
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_NORMAL)


def fsync_directory(path: str) -> None:
    """fsync the directory holding ``path``, so a new entry in it survives a power cut."""
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def open_lock_file(path: str) -> int:
    """Open the lock file ``path`` (mode 0600), creating it durably (directory fsynced) if missing."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fsync_directory(path)
    except BaseException:
        os.close(fd)
        raise
    return fd
