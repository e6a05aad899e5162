"""Exceptions of the ring package.

A full ring is NOT an exception (``append`` returns ``False``, ``append_batch``
returns how many were appended); exceptions mean misuse or a damaged file::

    RingError                               root of everything raised by node.ring
    ├── RingConfigError (also ValueError)   bad argument to Ring.open (capacity, durability, backend)
    ├── RecordTooLarge (also ValueError)    a payload above ring.max_record (carries both sizes)
    ├── RingVersionError                    file written by another format version (names both)
    ├── RingCorrupt                         not a ring file, or a header that cannot be repaired live
    ├── RingBackendError                    the requested backend is unavailable (e.g. libpmem missing)
    ├── RingPersistError (also OSError)     persist (msync / pmem) failed: the records are NOT durable
    ├── RingPositionError (also ValueError) read/pop at a position that is not a valid record boundary
    ├── RingNamespaceError                  ring created in another PID namespace (names both)
    ├── RingSpaceError (also OSError)       ring file not fully allocated on disk (names path and bytes)
    ├── ConsumerBusy                        another process already consumes this ring (names the lock)
    └── RingClosed                          the ring or reader was used after close()
"""

from __future__ import annotations


class RingError(Exception):
    """Root of every exception raised by :mod:`node.ring`."""


class RingConfigError(RingError, ValueError):
    """An argument of :meth:`Ring.open` has a value the ring cannot use."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        self.name = name
        self.value = value
        super().__init__(f"{name}={value!r}: {reason}")


class RecordTooLarge(RingError, ValueError):
    """A payload is larger than the ring's ``max_record``."""

    def __init__(self, size: int, max_record: int, index: int = 0) -> None:
        self.size = size
        self.max_record = max_record
        self.index = index
        super().__init__(f"record {index} is {size} bytes, the ring accepts at most {max_record}")


class RingVersionError(RingError):
    """The file was written by another version of the ring format."""

    def __init__(self, path: str, found: int, expected: int) -> None:
        self.path = path
        self.found = found
        self.expected = expected
        super().__init__(f"{path}: ring format version {found}, this code reads version {expected}")


class RingCorrupt(RingError):
    """The file is not a ring, or its structure is damaged beyond live repair."""


class RingBackendError(RingError):
    """The requested persistence backend cannot be used here."""


class RingPersistError(RingError, OSError):
    """Persisting appended records or the head failed (errno carried)."""


class RingPositionError(RingError, ValueError):
    """A position handed to read/pop is not usable (below head, beyond what was read, not a boundary)."""


class ConsumerBusy(RingError):
    """Another reader (in this or another process) holds the consumer lock."""

    def __init__(self, lock_path: str) -> None:
        self.lock_path = lock_path
        super().__init__(f"ring already has a consumer (lock {lock_path} is held)")


class RingClosed(RingError):
    """The ring or reader was used after ``close()``."""


class RingNamespaceError(RingError):
    """The ring was created in another PID namespace: its producers' liveness cannot be read here."""

    def __init__(self, path: str, found: int, expected: int) -> None:
        self.path = path
        self.found = found
        self.expected = expected
        super().__init__(
            f"{path}: ring created in PID namespace {found} (inode of /proc/self/ns/pid), this process is in"
            f" PID namespace {expected}; every producer and the consumer must share one PID namespace"
        )


class RingSpaceError(RingError, OSError):
    """The ring file's blocks are not all allocated (sparse): a write could fail with ENOSPC."""

    def __init__(self, path: str, needed: int, allocated: int) -> None:
        self.path = path
        self.needed = needed
        self.allocated = allocated
        super().__init__(
            f"{path}: ring file needs {needed} bytes allocated on disk, only {allocated} are"
            " (sparse or truncated file; recreate it, or free space and preallocate it with fallocate)"
        )
