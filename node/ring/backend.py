"""Persistence backends: how the ring file is mapped and made durable.

One small interface, :class:`Mapping` (map, persist(offset, length), unmap,
is_pmem), with two implementations:

* :class:`PmemMapping` -- libpmem (PMDK) loaded at run time in cffi ABI mode
  (``ffi.dlopen("libpmem.so.1")``); never a link-time dependency.  On DAX
  persistent memory (``pmem_is_pmem`` true) persistence is a cache flush
  (``pmem_persist``): backend ``"pmem"``.  On an ordinary file it is
  ``pmem_msync``: backend ``"msync"``.  ``PMEM_IS_PMEM_FORCE=1`` (a libpmem
  variable, read by libpmem once per process) makes any mapping count as pmem.
* :class:`MmapMapping` -- Python :mod:`mmap` + ``msync`` (through the C helper):
  backend ``"mmap"``, used where libpmem is not installed.  Same file format, same
  guarantees.  PMDK upstream is archived; this path stands on its own.
* :class:`SimMapping` -- TESTS ONLY, the power-loss simulator (backend ``"sim"``,
  refused unless ``IOTNODE_RING_POWERSIM=1``; with that variable ``"auto"`` selects it
  too, so a whole node under test uses it).  A persist copies the whole cache lines
  (``IOTNODE_RING_POWERSIM_MODEL=pmem``, the default; ``=pmem-nt``: every append takes
  the pmem backend's non-temporal path, whose flushed lines and non-temporal lines are
  what it copies) or pages (``=msync``) it covers
  from the live mapping into ``<ring>.durable``, the durable image;
  :mod:`node.ring.powersim` builds post-crash images from the two files.

The C helper does the persisting on the hot path: each mapping exposes
``persist_mode`` / ``persist_fn`` (a function pointer as an integer) for it.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import Any

from node.ring._native import ffi, lib
from node.ring.errors import RingBackendError

log = logging.getLogger("node.ring")

BACKENDS = ("auto", "pmem", "msync", "mmap", "sim")
POWERSIM_ENV = "IOTNODE_RING_POWERSIM"  # "1": backend "sim" allowed, and chosen by "auto"
POWERSIM_MODEL_ENV = "IOTNODE_RING_POWERSIM_MODEL"  # "pmem" (64-byte lines, default) | "msync" (pages)
SIM_UNITS = {"pmem": 64, "pmem-nt": 64, "msync": mmap.PAGESIZE}  # "pmem-nt": every append non-temporal
DURABLE_SUFFIX = ".durable"

# persist_mode values understood by the C helper
PERSIST_NONE = 0
PERSIST_VOID_FN = 1  # void fn(const void *, size_t): pmem_persist
PERSIST_INT_FN = 2  # int fn(const void *, size_t): pmem_msync
PERSIST_MSYNC = 3  # msync in the helper
PERSIST_SIM = 4  # power simulator: copy the persisted units into the durable image

_PMEM_CDEF = """
void *pmem_map_file(const char *path, size_t len, int flags, unsigned int mode, size_t *mapped_lenp,
                    int *is_pmemp);
int pmem_unmap(void *addr, size_t len);
int pmem_is_pmem(const void *addr, size_t len);
void pmem_persist(const void *addr, size_t len);
void pmem_flush(const void *addr, size_t len);
void pmem_drain(void);
int pmem_msync(const void *addr, size_t len);
const char *pmem_errormsg(void);
"""

_libpmem: tuple[Any, Any] | None = None
_libpmem_error: str | None = None


def load_libpmem() -> tuple[Any, Any] | None:
    """(ffi, lib) of libpmem, or None if it is not installed (the reason in :func:`libpmem_error`)."""
    global _libpmem, _libpmem_error
    if _libpmem is None and _libpmem_error is None:
        import cffi  # type: ignore[import-untyped]

        abi = cffi.FFI()
        abi.cdef(_PMEM_CDEF)
        try:
            _libpmem = (abi, abi.dlopen("libpmem.so.1"))
        except OSError as exc:
            _libpmem_error = str(exc)
    return _libpmem


def libpmem_error() -> str | None:
    load_libpmem()
    return _libpmem_error


_libc: Any = None


def advise_random(address: int, size: int) -> None:
    """``madvise(MADV_RANDOM)`` on a mapping of a ring file: no readahead on its faults.

    Readahead on a mapping's page faults builds large page-cache folios (up to 2 MiB
    on Linux >= 6.16 with ext4), and a folio is dirtied and written back whole: a
    one-record persist then writes the whole folio (2 MiB for ~200 bytes, docs/ring.md,
    "Page cache").  With no readahead a fault brings in one page.  Harmless on DAX
    (no page cache) and on kernels without large folios.  A refusal is logged, not
    raised: it costs write amplification, never correctness.
    """
    global _libc
    if _libc is None:
        import cffi

        abi = cffi.FFI()
        abi.cdef("int madvise(void *addr, size_t length, int advice);")
        _libc = (abi, abi.dlopen(None))
    abi, libc = _libc
    if libc.madvise(abi.cast("void *", address), size, mmap.MADV_RANDOM) != 0:
        log.warning("madvise(MADV_RANDOM) on a ring mapping failed: %s", os.strerror(abi.errno))


class Mapping:
    """A mapped ring file.  ``view`` is a writable memoryview of the whole file."""

    name: str
    address: int
    size: int
    view: memoryview
    is_pmem: bool
    persist_mode: int
    persist_fn: int
    # pmem only: pmem_flush / pmem_drain, so the C helper can store payloads
    # non-temporally and flush just the header lines (0 elsewhere)
    flush_fn: int = 0
    drain_fn: int = 0
    # power simulator only: the durable image's mapping and the persist unit
    sim_base: int = 0
    sim_unit: int = 0
    sim_nt: int = 0

    def persist(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` of the file durable (a no-op is never allowed)."""
        ctx = ffi.new("iotring_ctx *")
        ctx.base = self.address
        ctx.persist_mode = self.persist_mode
        ctx.persist_fn = self.persist_fn
        ctx.pagesize = mmap.PAGESIZE
        ctx.sim_base = self.sim_base
        ctx.sim_size = self.size
        ctx.sim_unit = self.sim_unit
        rc = lib.iotring_persist(ctx, offset, length)
        if rc:
            raise OSError(-rc, os.strerror(-rc))

    def close(self) -> None:
        raise NotImplementedError


class PmemMapping(Mapping):
    def __init__(self, path: str, size: int, want: str) -> None:
        loaded = load_libpmem()
        if loaded is None:
            raise RingBackendError(
                f"backend {want!r} needs libpmem.so.1, which failed to load: {_libpmem_error}"
            )
        abi, pm = loaded
        self._abi, self._pm = abi, pm
        mapped_len = abi.new("size_t *")
        is_pmem = abi.new("int *")
        addr = pm.pmem_map_file(os.fsencode(path), 0, 0, 0, mapped_len, is_pmem)
        if addr == abi.NULL:
            raise RingBackendError(
                f"pmem_map_file({path!r}) failed: {abi.string(pm.pmem_errormsg()).decode()}"
            )
        if mapped_len[0] != size:
            pm.pmem_unmap(addr, mapped_len[0])
            raise RingBackendError(f"pmem_map_file({path!r}) mapped {mapped_len[0]} bytes, expected {size}")
        self._addr = addr
        self.size = size
        self.is_pmem = bool(is_pmem[0]) and bool(pm.pmem_is_pmem(addr, size))
        if want == "pmem" and not self.is_pmem:
            pm.pmem_unmap(addr, size)
            raise RingBackendError(
                f"backend 'pmem' requested but {path} is not persistent memory (pmem_is_pmem=0);"
                " use 'auto' or 'msync', or PMEM_IS_PMEM_FORCE=1 for tests"
            )
        if want == "msync" or not self.is_pmem:
            self.name = "msync"
            self.persist_mode = PERSIST_INT_FN
            self.persist_fn = int(abi.cast("uintptr_t", pm.pmem_msync))
        else:
            self.name = "pmem"
            self.persist_mode = PERSIST_VOID_FN
            self.persist_fn = int(abi.cast("uintptr_t", pm.pmem_persist))
            self.flush_fn = int(abi.cast("uintptr_t", pm.pmem_flush))
            self.drain_fn = int(abi.cast("uintptr_t", pm.pmem_drain))
        self.address = int(abi.cast("uintptr_t", addr))
        self.view = memoryview(abi.buffer(abi.cast("char *", addr), size))
        advise_random(self.address, size)

    def close(self) -> None:
        if self._addr is not None:
            self.view.release()
            self._pm.pmem_unmap(self._addr, self.size)
            self._addr = None


class MmapMapping(Mapping):
    def __init__(self, fd: int, size: int) -> None:
        self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._cbuf = ffi.from_buffer("char[]", self._mm, require_writable=True)
        self.address = int(ffi.cast("uintptr_t", self._cbuf))
        self.size = size
        self.is_pmem = False
        self.name = "mmap"
        self.persist_mode = PERSIST_MSYNC
        self.persist_fn = 0
        self.view = memoryview(self._mm)
        self._open = True
        advise_random(self.address, size)

    def close(self) -> None:
        if self._open:
            self._open = False
            self.view.release()
            ffi.release(self._cbuf)
            self._mm.close()


class SimMapping(MmapMapping):
    """TESTS ONLY: the live mapping of the ring plus its durable image ``<ring>.durable``.

    The image is created from the ring file when missing (the file itself was made
    durable by fsync at creation) and mapped shared, so every process of a test
    persists into the same image.
    """

    def __init__(self, path: str, fd: int, size: int) -> None:
        model = os.environ.get(POWERSIM_MODEL_ENV, "pmem")
        if model not in SIM_UNITS:
            raise RingBackendError(f"{POWERSIM_MODEL_ENV}={model!r}: expected one of {', '.join(SIM_UNITS)}")
        super().__init__(fd, size)
        self.name = "sim"
        self.model = model
        self.persist_mode = PERSIST_SIM
        self.sim_unit = SIM_UNITS[model]
        self.sim_nt = 1 if model == "pmem-nt" else 0
        durable = path + DURABLE_SUFFIX
        dfd = os.open(durable, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(dfd).st_size != size:
                os.ftruncate(dfd, size)
                os.pwrite(dfd, os.pread(fd, size, 0), 0)
            self._dmm = mmap.mmap(dfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(dfd)
        self._dbuf = ffi.from_buffer("char[]", self._dmm, require_writable=True)
        self.sim_base = int(ffi.cast("uintptr_t", self._dbuf))

    def close(self) -> None:
        if self._open:
            ffi.release(self._dbuf)
            self._dmm.close()
        super().close()


def open_mapping(path: str, fd: int, size: int, backend: str) -> Mapping:
    """Map ``path`` (already open as ``fd``, ``size`` bytes) with the chosen backend.

    ``auto``: libpmem when it loads (``pmem`` or ``msync``), else ``mmap``; the power
    simulator instead when ``IOTNODE_RING_POWERSIM=1`` (tests only).
    """
    sim_allowed = os.environ.get(POWERSIM_ENV) == "1"
    if backend == "sim" or (backend == "auto" and sim_allowed):
        if not sim_allowed:
            raise RingBackendError(f"backend 'sim' is the test-only power simulator: set {POWERSIM_ENV}=1")
        return SimMapping(path, fd, size)
    if backend == "mmap":
        return MmapMapping(fd, size)
    if backend == "auto":
        if load_libpmem() is None:
            return MmapMapping(fd, size)
        try:
            return PmemMapping(path, size, "auto")
        except RingBackendError as exc:  # e.g. pmem_map_file refused this file system
            log.warning("%s; falling back to the mmap backend", exc)
            return MmapMapping(fd, size)
    return PmemMapping(path, size, backend)
