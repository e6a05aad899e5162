"""TESTS ONLY: the power-loss simulator of the ring.

Select it with ``IOTNODE_RING_POWERSIM=1`` in the environment (then ``Ring.open``'s
``backend="auto"`` -- what every node process uses -- and ``backend="sim"`` map the
ring with :class:`node.ring.backend.SimMapping`).  Never set it in production: appends
then persist into a second file instead of the media.

The model.  Besides the live file ``<ring>`` (the page cache every process maps),
``<ring>.durable`` holds what the media would hold.  A range becomes durable only
when the ring persists it: the C helper's persist (``pmem_persist`` / ``msync`` in
production) copies every whole unit the range touches -- 64-byte cache lines
(``IOTNODE_RING_POWERSIM_MODEL=pmem``, default) or pages (``=msync``) -- from the live
mapping into the durable one, in whichever process persists.  A power cut may leave
the durable image plus *any* subset of the units written since (a cache line evicted
early, a page written back by the kernel): :func:`crash_image` builds one such legal
post-crash image, choosing each differing unit of ``granularity`` bytes (64 for the
pmem model, 512 for disk sectors, 4096 for pages) from the live file with
probability ``keep`` (pmreorder-style).  Units are taken whole: 8-byte stores are
atomic in both models, and a cache line or sector is written as a whole.

Not modelled: the non-temporal payload stores of the pmem backend's batch path (the
simulator persists through ``persist_range`` only, the path the other backends use);
reordering *within* a unit; a torn unit.

Typical test::

    os.environ["IOTNODE_RING_POWERSIM"] = "1"       # before any process opens the ring
    ring = Ring.open(path, backend="sim")
    ...                                              # freeze other processes (SIGSTOP)
    image = crash_image(path, random.Random(seed))  # the power is cut here
    records, epoch = recover_image(image, scratch)  # what the next boot would find
    # or for real: close/kill everything, install_image(path, image), Ring.open(path)
"""

from __future__ import annotations

import os
import random

from node.ring import descriptor as D
from node.ring._native import lib
from node.ring.backend import DURABLE_SUFFIX, POWERSIM_ENV, POWERSIM_MODEL_ENV
from node.ring.errors import RingError
from node.ring.reader import Reader
from node.ring.ring import Ring

#: ctx.test_flags: the orderings before issue 12, which the simulator must catch.
LEGACY_HEAD = 1  # pop publishes the producers' head before persisting it
LEGACY_COMMIT = 2  # append stores the commit marker and wakes before its persist
LEGACY_RESOLVE = 4  # a dead claim is committed with only its header persisted

_CHUNK = 1 << 16

__all__ = [
    "LEGACY_COMMIT",
    "LEGACY_HEAD",
    "LEGACY_RESOLVE",
    "POWERSIM_ENV",
    "POWERSIM_MODEL_ENV",
    "crash_image",
    "durable_path",
    "fail_persists",
    "install_image",
    "pending_units",
    "pop_before_persist",
    "recover_image",
    "set_test_flags",
]


def durable_path(ring_path: str | os.PathLike[str]) -> str:
    """The durable image beside the ring file."""
    return os.fspath(ring_path) + DURABLE_SUFFIX


def _read_pair(ring_path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    with open(ring_path, "rb") as fh:
        live = fh.read()
    try:
        with open(durable_path(ring_path), "rb") as fh:
            durable = fh.read()
    except FileNotFoundError:
        raise RingError(
            f"{durable_path(ring_path)} missing: was the ring opened with the sim backend?"
        ) from None
    if len(live) != len(durable):
        raise RingError(f"{ring_path}: live file {len(live)} bytes, durable image {len(durable)}")
    return live, durable


def pending_units(ring_path: str | os.PathLike[str], granularity: int = 64) -> list[int]:
    """File offsets of the ``granularity``-byte units written but not (all) persisted."""
    live, durable = _read_pair(ring_path)
    out: list[int] = []
    for base in range(0, len(live), _CHUNK):  # fast path: compare 64 KiB at a time
        if live[base : base + _CHUNK] == durable[base : base + _CHUNK]:
            continue
        for off in range(base, min(base + _CHUNK, len(live)), granularity):
            if live[off : off + granularity] != durable[off : off + granularity]:
                out.append(off)
    return out


def crash_image(
    ring_path: str | os.PathLike[str], rng: random.Random, granularity: int = 64, keep: float = 0.5
) -> bytes:
    """A legal content of the ring file after a power cut *now*.

    The durable image plus each not-yet-persisted unit of ``granularity`` bytes taken
    from the live file with probability ``keep`` (0: only what was persisted; 1: as
    after a process crash).  Every process writing the ring must be stopped (SIGSTOP)
    or quiet while it is taken.
    """
    if granularity <= 0 or granularity & (granularity - 1) or granularity > _CHUNK:
        raise ValueError(f"granularity={granularity}: expected a power of two up to {_CHUNK}")
    live, durable = _read_pair(ring_path)
    image = bytearray(durable)
    for off in pending_units(ring_path, granularity):
        if rng.random() < keep:
            image[off : off + granularity] = live[off : off + granularity]
    return bytes(image)


def install_image(ring_path: str | os.PathLike[str], image: bytes) -> None:
    """Make ``image`` the ring's content on "media" and in the "page cache" (the reboot).

    No process may have the ring open (kill them first).  Written in place, so the
    file keeps its allocated blocks.
    """
    for path in (os.fspath(ring_path), durable_path(ring_path)):
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != len(image):
                raise RingError(f"{path}: {os.fstat(fd).st_size} bytes, image has {len(image)}")
            os.pwrite(fd, image, 0)
        finally:
            os.close(fd)


def recover_image(image: bytes, scratch_path: str | os.PathLike[str]) -> tuple[list[tuple[int, bytes]], int]:
    """What the next boot finds in ``image``: ``([(pos, payload), ...], epoch)`` after recovery.

    Writes the image to ``scratch_path`` (reused in place if it exists), opens it
    with the plain mmap backend (recovery runs: the caller must not have it open)
    and reads every record from the head.  The ring at ``scratch_path`` is closed
    again; the caller may reopen it to go on.
    """
    path = os.fspath(scratch_path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size != len(image):
            os.ftruncate(fd, 0)
        os.pwrite(fd, image, 0)  # a scratch copy: no fsync needed
    finally:
        os.close(fd)
    with Ring.open(path, capacity=len(image) - D.HEADER_SIZE, backend="mmap") as ring:
        if not ring.recovered:
            raise RingError(f"{path} is open elsewhere: recovery did not run")
        reader = ring.reader()
        out: list[tuple[int, bytes]] = []
        for _ in range(1 + ring.capacity // D.RECORD_ALIGNMENT):  # bounded: one lap of records at most
            recs = reader.read(max_records=4096, max_bytes=1 << 30)
            if not recs:
                break
            out.extend((r.pos, r.payload) for r in recs)
        return out, ring.epoch


def set_test_flags(ring: Ring, flags: int) -> None:
    """Switch ``ring`` (this process's object only) to the legacy orderings in ``flags``."""
    ring._ctx.test_flags = flags


def fail_persists(ring: Ring, fail: bool = True) -> None:
    """Make every persist of this process's ``ring`` object fail with EIO (sim backend only)."""
    if ring.backend != "sim":
        raise RingError(f"fail_persists needs the sim backend, not {ring.backend!r}")
    ring._ctx.sim_eio = 1 if fail else 0


def pop_before_persist(reader: Reader, to_pos: int) -> int:
    """TEST HOOK: ``reader.pop(to_pos)`` frozen just before its persist (as a consumer
    stopped there).  Returns the records it releases; finish with ``reader.pop(to_pos)``
    (pops nothing new but persists and publishes)."""
    head = reader.ring.head
    n = int(lib.iotring_count(reader.ring.ctx, head, to_pos))
    if n < 0 or to_pos > reader._scanned:
        raise RingError(f"pop_before_persist to {to_pos}: not a record boundary read after head {head}")
    lib.iotring_pop_staged(reader.ring.ctx, to_pos, n, 1)
    return n
