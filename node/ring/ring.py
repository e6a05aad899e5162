"""The persistent multi-producer ring: open (with recovery), append, counters.

Any number of producer processes and one consumer (:class:`node.ring.reader.Reader`)
share one file.  Every process opens the file itself (after fork).  The layout is in
:mod:`node.ring.descriptor`, the hot paths in the C helper (``_cbuild.py``), the
mapping/persistence in :mod:`node.ring.backend`.

Append = one C call per batch (GIL released): under a robust process-shared mutex,
check free space and write every record header in the *claimed* state (position +
producer identity), publish the tail, unlock; then copy payloads, checksum, store the
commit marker, and persist the batch's whole range once.

Open: ``flock(LOCK_EX)`` on ``<ring>.lock`` serialises openers; if
``flock(ring, LOCK_EX|LOCK_NB)`` succeeds nobody else has the ring open, so the ring
is recovered (every record from the head is checksum-verified, torn ones become
padding, tail and counters recomputed, the claim mutex re-initialised); then every
process holds ``LOCK_SH`` on the ring file for as long as it has it open.

The open file, its mapping and the C context live in :mod:`node.ring.mapped`, which
the ring and its :class:`~node.ring.reader.Reader` share (this module imports the
reader; the reader imports only ``mapped``).  Power-loss ordering rules: see
"Power loss" in ``docs/ring.md``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import time
import weakref
from array import array
from collections.abc import Sequence
from typing import Self

from node.ring import descriptor as D
from node.ring._native import APPEND_IOV, append_list, ffi, lib
from node.ring.backend import BACKENDS
from node.ring.errors import (
    RecordTooLarge,
    RingClosed,
    RingConfigError,
    RingCorrupt,
    RingError,
    RingNamespaceError,
    RingPersistError,
    RingSpaceError,
    RingVersionError,
)
from node.ring.liveness import identity, pid_namespace
from node.ring.mapped import MappedRing, fsync_directory, open_lock_file, reset_page_cache
from node.ring.reader import Reader

log = logging.getLogger("node.ring")

DURABILITIES = ("power", "process")
_TOO_LARGE = -(1 << 40)  # iotring_append: _TOO_LARGE - index when lens[index] > max_record
_BAD_LENGTHS = -(1 << 41)  # iotring_append_packed: lengths do not add up to the buffer
_NOT_BYTES = -(1 << 42)  # append_list: item _NOT_BYTES - rc is not exactly bytes (general path instead)

_open_rings: weakref.WeakSet[Ring] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    pid, token = identity()
    for ring in list(_open_rings):
        ring._set_identity(pid, token)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_capacity(capacity: int) -> None:
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise RingConfigError("capacity", capacity, "expected an int")
    if capacity < D.MIN_CAPACITY or capacity > D.MAX_CAPACITY or capacity & (capacity - 1):
        raise RingConfigError(
            "capacity", capacity, f"expected a power of two between {D.MIN_CAPACITY} and {D.MAX_CAPACITY}"
        )


class Ring:
    """An open ring file.  Use :meth:`Ring.open`."""

    path: str
    backend: str
    ring_id: bytes
    capacity: int
    max_record: int
    durability: str
    recovered: bool

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        capacity: int = 64 << 20,
        durability: str = "power",
        backend: str = "auto",
    ) -> Ring:
        """Open (creating if missing) the ring at ``path``.

        ``capacity`` (data bytes, a power of two) is used only when creating; an
        existing file keeps its own.  ``durability``: ``"power"`` persists before
        append returns; ``"process"`` skips the persist (survives process crashes,
        not power loss).  ``backend``: ``"auto"`` | ``"pmem"`` | ``"msync"`` | ``"mmap"``
        (``"sim"``: the test-only power simulator, see :mod:`node.ring.powersim`).
        """
        _check_capacity(capacity)
        if durability not in DURABILITIES:
            raise RingConfigError("durability", durability, f"expected one of {', '.join(DURABILITIES)}")
        if backend not in BACKENDS:
            raise RingConfigError("backend", backend, f"expected one of {', '.join(BACKENDS)}")
        fspath = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(fspath))
        if not os.path.isdir(parent):
            raise RingConfigError("path", fspath, f"directory {parent} does not exist")
        ring = cls.__new__(cls)
        ring._open(fspath, capacity, durability, backend)
        return ring

    # ------------------------------------------------------------------ open
    def _open(self, path: str, capacity: int, durability: str, backend: str) -> None:
        self.path = path
        self.durability = durability
        self._closed = True
        self._m: MappedRing | None = None
        lock_fd = open_lock_file(path + ".lock")
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if not os.path.exists(path) or os.path.getsize(path) == 0:
                self._create(path, capacity)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                hdr = self._check_header(path, fd)
                alone = self._lock_if_alone(fd)
                if alone:
                    reset_page_cache(fd, D.file_size(hdr.capacity))
                m = MappedRing(path, fd, hdr, backend)
            except BaseException:
                os.close(fd)
                raise
            self._m = m
            try:
                if hdr.capacity != capacity:
                    log.warning(
                        "ring %s exists with capacity %d; requested %d ignored", path, hdr.capacity, capacity
                    )
                self.capacity = m.capacity
                self.max_record = m.max_record
                self.ring_id = m.ring_id
                self.backend = m.backend
                self._ctx = m.ctx
                self._set_identity(*identity())
                self.recovered = self._recover() if alone else False
                self._epoch = m.load(D.EPOCH_OFFSET)  # changes only at an exclusive open: read once
                if durability == "process":
                    m.skip_persist()
            except BaseException:
                self._release()
                raise
        finally:
            os.close(lock_fd)  # releases the opener lock
        self._closed = False
        self._reader: Reader | None = None
        self._out_first = ffi.new("uint64_t *")
        self._ctx_addr = int(ffi.cast("uintptr_t", self._ctx))
        self._out_first_addr = int(ffi.cast("uintptr_t", self._out_first))
        _open_rings.add(self)
        log.info(
            "ring %s open: backend=%s capacity=%d max_record=%d durability=%s head=%d tail=%d epoch=%d%s",
            path,
            self.backend,
            self.capacity,
            self.max_record,
            durability,
            self.head,
            self.tail,
            self.epoch,
            " (recovered)" if self.recovered else "",
        )

    @staticmethod
    def _create(path: str, capacity: int) -> None:
        """Write a new ring durably: temp file (0600, every block allocated), fsync, rename, dir fsync."""
        tmp = f"{path}.tmp-{os.getpid()}"
        size = D.file_size(capacity)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            header = D.pack_file_header(
                capacity, secrets.token_bytes(D.RING_ID_LENGTH), time.time_ns(), pid_namespace()
            )
            os.pwrite(fd, header, 0)
            try:
                os.posix_fallocate(fd, 0, size)  # no ENOSPC later inside a mapping (SIGBUS)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise RingSpaceError(path, size, os.fstat(fd).st_blocks * 512) from exc
                zeros = bytes(1 << 20)  # a file system without fallocate: write the blocks
                for off in range(D.HEADER_SIZE, size, len(zeros)):
                    os.pwrite(fd, zeros[: min(len(zeros), size - off)], off)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)
        fsync_directory(path)
        log.info("ring %s created with capacity %d", path, capacity)

    @staticmethod
    def _check_header(path: str, fd: int) -> D.FileHeader:
        page = os.pread(fd, D.HEADER_SIZE, 0)
        if len(page) < D.HEADER_SIZE:
            raise RingCorrupt(f"{path}: {len(page)} bytes, too short for a ring header ({D.HEADER_SIZE})")
        hdr = D.unpack_file_header(page)
        if hdr.magic != D.MAGIC:
            raise RingCorrupt(f"{path}: not a ring file (magic {hdr.magic!r}, expected {D.MAGIC!r})")
        if hdr.version != D.VERSION:
            raise RingVersionError(path, hdr.version, D.VERSION)
        cap = hdr.capacity
        if hdr.header_size != D.HEADER_SIZE:
            raise RingCorrupt(f"{path}: header size {hdr.header_size}, expected {D.HEADER_SIZE}")
        if cap < D.MIN_CAPACITY or cap > D.MAX_CAPACITY or cap & (cap - 1):
            raise RingCorrupt(f"{path}: capacity {cap} in the header is not a valid power of two")
        if hdr.max_record != D.max_record_for(cap):
            raise RingCorrupt(f"{path}: max record {hdr.max_record}, expected {D.max_record_for(cap)}")
        st = os.fstat(fd)
        if st.st_size != D.file_size(cap):
            raise RingCorrupt(
                f"{path}: file is {st.st_size} bytes, a ring of capacity {cap} has {D.file_size(cap)}"
            )
        if st.st_blocks * 512 < st.st_size:
            raise RingSpaceError(path, st.st_size, st.st_blocks * 512)
        here = pid_namespace()
        if hdr.pid_namespace != here:
            raise RingNamespaceError(path, hdr.pid_namespace, here)
        return hdr

    @staticmethod
    def _lock_if_alone(fd: int) -> bool:
        """Under the opener lock: True (holding ``LOCK_EX``) when no other process has
        the ring open, else False (holding ``LOCK_SH``, as every opener does)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return False
        return True

    def _recover(self) -> bool:
        """Recovery by the exclusive opener (see :meth:`_lock_if_alone`); downgrades to ``LOCK_SH``."""
        assert self._m is not None
        fd = self._m.fd
        tail = ffi.new("uint64_t *")
        count = ffi.new("uint64_t *")
        repaired = ffi.new("uint64_t *")
        rc = lib.iotring_recover(self._ctx, tail, count, repaired)
        if rc == -22:
            head = int(lib.iotring_load64(self._ctx, D.HEAD_OFFSET))
            raise RingCorrupt(f"{self.path}: head {head} is not aligned to {D.RECORD_ALIGNMENT}")
        if rc:
            raise RingPersistError(
                -rc, f"{self.path}: persisting the recovered ring failed: {os.strerror(-rc)}"
            )
        if repaired[0]:
            log.warning(
                "ring %s: recovery turned %d torn or unfinished region(s) into padding",
                self.path,
                repaired[0],
            )
        log.info(
            "ring %s recovered: %d record(s) from %d to %d, epoch %d",
            self.path,
            count[0],
            lib.iotring_load64(self._ctx, D.HEAD_OFFSET),
            tail[0],
            lib.iotring_load64(self._ctx, D.EPOCH_OFFSET),
        )
        fcntl.flock(fd, fcntl.LOCK_SH)  # under the opener lock: nobody can slip in
        return True

    def _set_identity(self, pid: int, token: int) -> None:
        self._ctx.pid = pid
        self._ctx.token = token

    # ------------------------------------------------------------------ producers
    def append(self, payload: bytes) -> bool:
        """Append one record; True once it is durable, False if the ring is full."""
        if self._closed:
            raise RingClosed(f"{self.path}: ring is closed")
        if type(payload) is not bytes:
            payload = bytes(payload)
        n = len(payload)
        if n > self.max_record:
            raise RecordTooLarge(n, self.max_record)
        rc = lib.iotring_append1(self._ctx, payload, n, self._out_first)
        if rc < 0:
            self._raise_persist(rc)
        return bool(rc == 1)

    def append_batch(self, payloads: Sequence[bytes]) -> int:
        """Append a prefix of ``payloads``; return how many (0 when full).  One persist."""
        if self._closed:
            raise RingClosed(f"{self.path}: ring is closed")
        # A list/tuple of bytes goes to C as it is (node/ring/_gather.c: no join, no
        # length array); anything else (bytearray, memoryview items, other sequences)
        # takes the general path below.
        rc = append_list(APPEND_IOV, self._ctx_addr, payloads, self._out_first_addr)
        if rc >= 0:
            return int(rc)
        if rc > _NOT_BYTES:
            if rc <= _TOO_LARGE:
                index = _TOO_LARGE - rc
                raise RecordTooLarge(len(payloads[index]), self.max_record, index)
            self._raise_persist(rc)
        count = len(payloads)
        if count == 0:
            return 0
        try:
            lens = array("I", map(len, payloads))
        except OverflowError:  # a payload of 4 GiB or more
            index = next(i for i, p in enumerate(payloads) if len(p) > self.max_record)
            raise RecordTooLarge(len(payloads[index]), self.max_record, index) from None
        buf = b"".join(payloads)
        rc = lib.iotring_append(self._ctx, buf, ffi.from_buffer("uint32_t[]", lens), count, self._out_first)
        if rc < 0:
            if rc <= _TOO_LARGE:  # the C helper checks every length before claiming
                index = _TOO_LARGE - rc
                raise RecordTooLarge(lens[index], self.max_record, index)
            self._raise_persist(rc)
        return int(rc)

    def append_packed(self, buf: bytes, lens: array) -> int:  # type: ignore[type-arg]
        """``append_batch`` for a caller that already holds the records back to back.

        ``buf`` holds the payloads concatenated, ``lens`` (an ``array("I")``) their
        lengths, which must add up to ``len(buf)``.  Saves building both per call.
        """
        if self._closed:
            raise RingClosed(f"{self.path}: ring is closed")
        if not isinstance(lens, array) or lens.typecode != "I":
            raise RingConfigError("lens", type(lens).__name__, 'expected array("I") of payload lengths')
        count = len(lens)
        if count == 0:
            return 0
        rc = lib.iotring_append_packed(
            self._ctx, buf, len(buf), ffi.from_buffer("uint32_t[]", lens), count, self._out_first
        )
        if rc < 0:
            if rc == _BAD_LENGTHS:
                raise RingConfigError(
                    "lens", f"sum {sum(lens)}", f"expected the lengths to add up to len(buf) = {len(buf)}"
                )
            if rc <= _TOO_LARGE:
                index = _TOO_LARGE - rc
                raise RecordTooLarge(lens[index], self.max_record, index)
            self._raise_persist(rc)
        return int(rc)

    def _append_partial(self, payloads: Sequence[bytes], stage: int) -> int:
        """TEST HOOK: claim ``payloads`` and stop as a producer killed mid-append would.

        ``stage`` -1: holding the claim mutex, tail not published; 0: only the claimed
        headers are written; 1: payloads and checksums too, but no commit marker and
        nothing persisted; 2: everything before the persist (with the legacy-commit
        test flag that includes the commit marker); 3: persisted, not committed.
        The caller must die right after (or, under the power simulator, the power is
        cut).  Used by the crash and power-loss tests; never by the node.
        """
        lens = array("I", map(len, payloads))
        rc = lib.iotring_append_partial(
            self._ctx,
            b"".join(payloads),
            ffi.from_buffer("uint32_t[]", lens),
            len(payloads),
            stage,
            self._out_first,
        )
        return int(rc)

    def _raise_persist(self, rc: int) -> None:
        raise RingPersistError(-rc, f"{self.path}: persist failed, records not durable: {os.strerror(-rc)}")

    # ------------------------------------------------------------------ counters (any process)
    def _load(self, offset: int) -> int:
        if self._closed:
            raise RingClosed(f"{self.path}: ring is closed")
        return int(lib.iotring_load64(self._ctx, offset))

    @property
    def epoch(self) -> int:
        """The ring's incarnation: +1 (persisted) at every recovery, i.e. every exclusive open.

        Fixed while this Ring is open (nobody can recover a ring others have open).  A
        position names one record only within one epoch: key peers by (ring_id, epoch, pos).
        """
        return self._epoch

    @property
    def incarnation(self) -> bytes:
        """``ring_id`` + ``epoch`` (8 bytes, big-endian): what peers key their state by.

        A position names the same record only within one incarnation: a recovery
        (a new epoch) may have turned records nobody saw into padding, and the next
        appends reuse those positions.  The monitor -> router dedup, the publisher's
        FETCH/RECORDS/CONFIRM and the store's cursor all use this identity, so a peer
        never takes a position of an earlier incarnation for one of this.
        """
        return self.ring_id + self.epoch.to_bytes(8, "big")

    @property
    def head(self) -> int:
        """Position of the oldest un-popped record."""
        return self._load(D.HEAD_OFFSET)

    @property
    def tail(self) -> int:
        """Position after the newest claimed record."""
        return self._load(D.TAIL_OFFSET)

    @property
    def depth(self) -> int:
        """Records appended (claimed) and not yet popped."""
        return max(0, self._load(D.APPENDED_OFFSET) - self._load(D.POPPED_OFFSET))

    @property
    def bytes_used(self) -> int:
        """Ring bytes holding un-popped records (headers and padding included)."""
        return max(0, self._load(D.TAIL_OFFSET) - self._load(D.HEAD_OFFSET))

    # ------------------------------------------------------------------ consumer
    def reader(self) -> Reader:
        """The single consumer of this ring (:class:`~node.ring.reader.Reader`).

        Calling it again on the same Ring returns the same reader while it is open;
        another Ring object (in this or another process) gets ConsumerBusy."""
        if self._closed or self._m is None:
            raise RingClosed(f"{self.path}: ring is closed")
        if self._reader is not None and not self._reader.closed:
            return self._reader  # one consumer per ring: the same reader again
        self._reader = Reader(self._m)
        return self._reader

    # ------------------------------------------------------------------ lifecycle
    def _release(self) -> None:
        if self._m is not None:
            self._m.close()  # unmaps, closes the file (drops LOCK_SH)
            self._m = None

    def close(self) -> None:
        if self._closed:
            return
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._closed = True
        _open_rings.discard(self)
        self._release()

    @property
    def closed(self) -> bool:
        return self._closed

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"head={self.head} tail={self.tail}"
        return f"<Ring {self.path} backend={getattr(self, 'backend', '?')} {state}>"


__all__ = ["Ring", "RingError"]
