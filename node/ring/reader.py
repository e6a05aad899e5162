"""The single consumer of a ring: read committed records, pop, wait.

Only one reader per ring file exists at a time (``flock(LOCK_EX|LOCK_NB)`` on
``<ring>.consumer``; a second one gets :class:`ConsumerBusy`).  Reading never
removes anything: a record is released only by :meth:`Reader.pop`.

A record claimed by a producer that is still alive (even one stopped with SIGSTOP)
blocks the reader at that position until it is committed.  If its producer is dead
(pid + start time, checked at most every few ms) the record is settled: delivered
if its checksum holds, else turned into padding (a delivered one is persisted whole
first).  "Dead" needs positive evidence (see :mod:`node.ring.liveness`).

Built on :class:`node.ring.mapped.MappedRing`, the open file it shares with its
:class:`~node.ring.ring.Ring`; this module imports nothing else of the ring.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from typing import NamedTuple, Self

from node.ring import descriptor as D
from node.ring._native import ffi, lib
from node.ring.errors import ConsumerBusy, RingClosed, RingCorrupt, RingPersistError, RingPositionError
from node.ring.liveness import is_alive
from node.ring.mapped import MappedRing, open_lock_file

log = logging.getLogger("node.ring")

# iotring_scan status codes (see _cbuild.py)
_SCAN_END, _SCAN_LIMIT, _SCAN_BLOCKED, _SCAN_CORRUPT, _SCAN_BADCRC = range(5)

LIVENESS_INTERVAL = 0.005  # seconds between /proc checks of one blocking claimer
_MAX_SETTLE = 1024  # claims settled per read() call at most (bounded loop)
_NOT_A_RECORD = -(1 << 20)  # iotring_resolve: no record header at that position


class Record(NamedTuple):
    pos: int  # absolute position of the record
    end: int  # position just after it (the next record's position, or padding)
    payload: bytes


class Reader:
    """The consumer side of a :class:`~node.ring.ring.Ring` (made by ``ring.reader()``)."""

    def __init__(self, ring: MappedRing) -> None:
        if ring.closed:
            raise RingClosed(f"{ring.path}: ring is closed")
        self.ring = ring
        self.lock_path = ring.path + ".consumer"
        fd = open_lock_file(self.lock_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConsumerBusy(self.lock_path) from None
        self._lock_fd = fd
        self._ctx = ring.ctx
        lib.iotring_reset_waiters(self._ctx)  # a killed consumer may have left waiters > 0
        self._cap = ring.capacity
        self._nbuf = 0
        self._grow(256)
        self._n = ffi.new("uint32_t *")
        self._next = ffi.new("uint64_t *")
        self._blk = ffi.new("iotring_block *")  # read() only
        self._wblk = ffi.new("iotring_block *")  # wait() only: it may run in another thread
        self._cursor = ring.head  # where the last scan stopped (wait() watches here)
        self._scanned = self._cursor  # highest position up to which records were read
        # popped to here by this reader, and only padding released from here to the head
        self._padding_from: int | None = None
        self._liveness: dict[tuple[int, int], tuple[float, bool]] = {}
        self._waiting = 0  # wait() calls in progress (a doorbell thread), see close()
        self.settled_dead = 0  # claims of dead producers delivered or padded
        self.skipped_corrupt = 0  # committed records whose checksum failed (never delivered)
        self._finish_pop()  # a consumer killed inside pop() may have left the free head behind

    def _grow(self, n: int) -> None:
        if n > self._nbuf:
            self._nbuf = max(n, 2 * self._nbuf)
            self._pos = ffi.new("uint64_t[]", self._nbuf)
            self._len = ffi.new("uint32_t[]", self._nbuf)

    def _check(self) -> None:
        if self._lock_fd < 0 or self.ring.closed:
            raise RingClosed(f"{self.ring.path}: reader or ring is closed")

    def _alive(self, pid: int, token: int) -> bool:
        now = time.monotonic()
        key = (pid, token)
        seen = self._liveness.get(key)
        if seen is not None and now - seen[0] < LIVENESS_INTERVAL:
            return seen[1]
        alive = is_alive(pid, token)
        if len(self._liveness) > 64:
            self._liveness.clear()
        self._liveness[key] = (now, alive)
        return alive

    # ------------------------------------------------------------------ read
    def read(
        self, from_pos: int | None = None, max_records: int = 256, max_bytes: int = 1 << 20
    ) -> list[Record]:
        """Committed records from ``from_pos`` (default: where the last read stopped), in order.

        At most ``max_records`` records and ``max_bytes`` payload bytes (at least one
        record if one is available).  ``from_pos`` must be ``>= ring.head`` and a
        record boundary (a ``pos`` or ``end`` returned earlier) -- or a position this
        reader popped to, after which it released only padding (a pop also releases
        the wrap padding it has scanned): the read then starts at the head.
        """
        self._check()
        head = self.ring.head
        pos = self._cursor if from_pos is None else from_pos
        if pos < head:
            if not self.padding_only_before_head(pos):
                raise RingPositionError(f"read from {pos}: below the ring head {head} (already popped)")
            pos = head  # [pos, head) was only padding, released with the pop to pos
        if pos & (D.RECORD_ALIGNMENT - 1):
            raise RingPositionError(f"read from {pos}: not a record boundary (positions are multiples of 32)")
        if max_records < 1:
            raise RingPositionError(f"max_records={max_records}: expected at least 1")
        tail = self.ring.tail
        if pos > tail:
            raise RingPositionError(f"read from {pos}: beyond the ring tail {tail}")
        start = pos
        self._grow(max_records)
        out: list[Record] = []
        view = self.ring.view
        mask = self._cap - 1
        base = D.DATA_OFFSET + D.RECORD_HEADER_LENGTH
        nbytes = 0
        for _ in range(_MAX_SETTLE):
            status = lib.iotring_scan(
                self._ctx,
                pos,
                max_records - len(out),
                max(0, max_bytes - nbytes),
                1,
                0 if out else 1,
                self._pos,
                self._len,
                self._n,
                self._next,
                self._blk,
            )
            for i in range(self._n[0]):
                p = self._pos[i]
                ln = self._len[i]
                off = base + (p & mask)
                out.append(
                    Record(p, p + ((D.RECORD_HEADER_LENGTH + ln + 31) & ~31), bytes(view[off : off + ln]))
                )
                nbytes += ln
            pos = self._next[0]
            if status == _SCAN_BLOCKED:
                bpos, bpid, btoken = self._blk.pos, self._blk.pid, self._blk.token
                if bpos == pos and len(out) < max_records and not self._alive(bpid, btoken):
                    delivered = self._resolve(bpos, 0)
                    self.settled_dead += 1
                    log.warning(
                        "ring %s: producer pid %d died holding a claim at %d; record %s",
                        self.ring.path,
                        bpid,
                        bpos,
                        "delivered (checksum valid)" if delivered else "dropped (torn)",
                    )
                    continue
                break
            if status == _SCAN_BADCRC:
                self._resolve(pos, 1)
                self.skipped_corrupt += 1
                log.error("ring %s: committed record at %d fails its checksum; skipped", self.ring.path, pos)
                continue
            if status == _SCAN_CORRUPT:
                if not out and pos == start and pos != head and not self._is_boundary(pos):
                    raise RingPositionError(f"read from {pos}: no record starts there")
                if not out:
                    raise RingCorrupt(
                        f"{self.ring.path}: no valid record header at position {pos}"
                        f" (head {head}, tail {self.ring.tail}); reopen the ring to recover"
                    )
            break
        self._cursor = max(
            self._cursor, pos
        )  # only forward: a replay of older records does not re-arm wait()
        self._scanned = max(self._scanned, pos)
        if not out:
            if pos > head and lib.iotring_count(self._ctx, head, pos) == 0:
                if self._padding_from is None:  # else [padding_from, head) is padding too
                    self._padding_from = head
                self._pop(pos, 0)  # only padding (or settled claims) before pos: release it
            else:
                self._finish_pop()
        return out

    def padding_only_before_head(self, pos: int) -> bool:
        """True if this reader popped to ``pos`` (or below) and released only padding from
        there to the head: nothing a consumer at ``pos`` lacks was released."""
        return self._padding_from is not None and self._padding_from <= pos

    def _finish_pop(self) -> None:
        """Persist and publish the head if an earlier pop did not get that far.

        Its persist failed, or the previous consumer died between storing the head and
        publishing the free head: producers would see the ring fuller than it is, and
        with nothing left to pop, forever.  Checked when a read finds nothing."""
        head = self.ring.head
        if self.ring.load(D.FREE_HEAD_OFFSET) < head:
            self._pop(head, 0)

    def _resolve(self, pos: int, force_pad: int) -> int:
        """Settle the record at ``pos`` (iotring_resolve): 1 delivered, 0 padded, -1 no record there."""
        rc = int(lib.iotring_resolve(self._ctx, pos, force_pad))
        if rc == _NOT_A_RECORD:
            return -1
        if rc < 0:
            raise RingPersistError(
                -rc, f"{self.ring.path}: persisting the settled record at {pos} failed: {os.strerror(-rc)}"
            )
        return rc

    def _is_boundary(self, pos: int) -> bool:
        """True if a record starts at ``pos`` (walking the headers from the head)."""
        return bool(lib.iotring_count(self._ctx, self.ring.head, pos) >= 0)

    # ------------------------------------------------------------------ pop
    def pop(self, to_pos: int) -> int:
        """Release every record before ``to_pos`` (persisted).  Returns how many were released."""
        self._check()
        head = self.ring.head
        if to_pos <= head:
            self._finish_pop()  # an earlier pop's persist failed (or was interrupted)
            return 0
        if to_pos > self._scanned:
            raise RingPositionError(f"pop to {to_pos}: beyond the last position read ({self._scanned})")
        n = lib.iotring_count(self._ctx, head, to_pos)
        if n < 0:
            raise RingPositionError(f"pop to {to_pos}: not a record boundary after head {head}")
        self._padding_from = to_pos  # everything before is popped; from here to the head only padding
        if self._cursor > to_pos and lib.iotring_count(self._ctx, to_pos, self._cursor) == 0:
            to_pos = self._cursor  # release the padding that follows too
        self._pop(to_pos, n)
        self._cursor = max(self._cursor, to_pos)
        return int(n)

    def _pop(self, to_pos: int, n: int) -> None:
        rc = lib.iotring_pop(self._ctx, to_pos, n)
        if rc:
            raise RingPersistError(-rc, f"{self.ring.path}: persisting the head failed: {os.strerror(-rc)}")

    # ------------------------------------------------------------------ wait
    def wait(self, timeout: float) -> bool:
        """Block (GIL released) until a record is committed past the last read position.

        Returns True when there is something for :meth:`read` (including a claim left
        by a dead producer, which read() settles), False on timeout.  No busy spin: a
        futex in the ring header, woken by producers.  May be called from one other
        thread (a doorbell) while the owning thread reads and pops; wait() has its own
        buffers.  read() and pop() themselves belong to one thread.
        """
        self._check()
        self._waiting += 1
        try:
            return self._wait(timeout)
        finally:
            self._waiting -= 1

    def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + max(0.0, timeout)
        for _ in range(1 + int(timeout / LIVENESS_INTERVAL) + 2):
            left = deadline - time.monotonic()
            if self._lock_fd < 0:
                return False  # closed meanwhile
            r = lib.iotring_wait(self._ctx, self._cursor, max(0, int(left * 1e9)), 1, self._wblk)
            if r == 1:
                return True
            if r <= 0:
                return False  # timeout, or cancelled by close()
            # r == 2: a claim blocks the cursor.
            if not self._alive(self._wblk.pid, self._wblk.token):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            r = lib.iotring_wait(
                self._ctx, self._cursor, int(min(left, LIVENESS_INTERVAL * 2) * 1e9), 0, self._wblk
            )
            if r == 1:
                return True
            if r < 0:
                return False
        return False

    def interrupt(self) -> None:
        """Make a wait() blocked in another thread of this process return False now (for
        its owner's shutdown: a doorbell thread may then wait long without bounding it)."""
        self._check()
        self._cancel_waits()
        self._ctx.cancel = 0

    def _cancel_waits(self) -> None:
        """Every wait() of this process on this ring returns False (until cancel is reset)."""
        self._ctx.cancel = 1
        lib.iotring_wake_all(self._ctx)
        for _ in range(2000):  # bounded: a woken wait returns within microseconds
            if not self._waiting:
                break
            time.sleep(0.001)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Release the consumer lock.  A wait() blocked in another thread returns False."""
        if self._lock_fd >= 0:
            if self._waiting:
                self._cancel_waits()
            os.close(self._lock_fd)
            self._lock_fd = -1

    @property
    def closed(self) -> bool:
        return self._lock_fd < 0

    def __del__(self) -> None:
        if getattr(self, "_lock_fd", -1) >= 0:
            self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
