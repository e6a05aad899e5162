"""The ring file layout: the ONE place that knows byte offsets.

Everything else (the Python ring, the C helper via :func:`c_defines`, tests)
uses the names defined here; no raw slices elsewhere.

File = one 4096-byte header page, then ``capacity`` data bytes (a power of two)::

      0                   1                   2                   3
      0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
     +---------------------------------------------------------------+
   0 |                    magic  "IOTRING\\0"  (8 bytes)              |
     +---------------------------------------------------------------+
   8 |     version (u32)             |      header size (u32)        |
     +---------------------------------------------------------------+
  16 |                      capacity (u64, data bytes)               |
     +---------------------------------------------------------------+
  24 |     max record (u32)          |      flags (u32, reserved)    |
     +---------------------------------------------------------------+
  32 |                      ring id (16 random bytes)                |
     +---------------------------------------------------------------+
  48 |                      created (u64, unix ns)                   |
     +---------------------------------------------------------------+
  56 |     PID namespace (u64: inode of /proc/self/ns/pid at creation)  |
     +---------------------------------------------------------------+
  64 |  claim mutex: robust, process-shared pthread_mutex_t (64 B)   |
     +---------------------------------------------------------------+
 128 |  tail (u64)   | appended (u64) | free head (u64) | ... producer |
     +---------------------------------------------------------------+
 192 |  head (u64)   | popped (u64)   |  ... consumer line (64 B)    |
     +---------------------------------------------------------------+
 256 |  futex (u32)  | waiters (u32)  |  ... wake line (64 B)        |
     +---------------------------------------------------------------+
 320 |  epoch (u64)  |  ... recovery line (64 B)                     |
     +---------------------------------------------------------------+
 384 |                      reserved (zero) up to 4096               |
     +---------------------------------------------------------------+
4096 |                      data: capacity bytes                     |
     +---------------------------------------------------------------+

Record = 32-byte header + payload, padded to a multiple of 32 bytes (so a padding
record always fits at the wrap point)::

      0                   1                   2                   3
      0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
     +---------------------------------------------------------------+
   0 |          position (u64): absolute byte position of the record |
     +---------------------------------------------------------------+
   8 |     length (u32, payload bytes)                               |
     +-------------------------------+-------------------------------+
  12 |     type (u16) DATA | PAD     |  state (u16) CLAIMED|COMMITTED|
     +-------------------------------+-------------------------------+
  16 |     checksum (u32, CRC32C)    |      producer pid (u32)       |
     +-------------------------------+-------------------------------+
  24 |     producer start time (u64, /proc/PID/stat field 22)        |
     +---------------------------------------------------------------+
  32 |     payload (length bytes), then zero..31 bytes of alignment  |
     +---------------------------------------------------------------+

* The checksum is CRC32C seeded with CRC32C(ring id) over header bytes
  [0, 14) and [20, 32) (position, length, type, producer) and the payload
  (none for padding).  The state word is the commit marker: it is written last.
* A header whose position differs from where it lies is stale (an earlier lap)
  or not yet written; no zeroing is needed on pop.
* ``head`` is the durable head (recovery starts there); ``free head`` is the head
  producers size their claims from.  ``pop`` stores and persists ``head`` first and
  only then publishes ``free head``, so no producer reuses bytes whose release is
  not yet durable (version 2; see "Power loss" in docs/ring.md).
* ``epoch`` (the ring incarnation) is incremented and persisted by every recovery
  (exclusive open), before any producer can claim: a position names one record only
  within one epoch.
* ``PID namespace`` is checked at every open: producer liveness is read from
  ``/proc``, which only means something inside the namespace the ring was made in.
* ``max_record`` = ``capacity // 4 - 32`` (capped at 1 GiB): a record plus a
  worst-case padding record always fit in an otherwise empty ring.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# --------------------------------------------------------------------- file header
MAGIC = b"IOTRING\x00"
VERSION = 2  # 2: free head, epoch, PID namespace
HEADER_SIZE = 4096  # data starts here (page aligned)
CACHE_LINE = 64

MAGIC_OFFSET = 0
VERSION_OFFSET = MAGIC_OFFSET + 8
HEADER_SIZE_OFFSET = VERSION_OFFSET + 4
CAPACITY_OFFSET = HEADER_SIZE_OFFSET + 4
MAX_RECORD_OFFSET = CAPACITY_OFFSET + 8
FLAGS_OFFSET = MAX_RECORD_OFFSET + 4
RING_ID_OFFSET = FLAGS_OFFSET + 4
RING_ID_LENGTH = 16
CREATED_OFFSET = RING_ID_OFFSET + RING_ID_LENGTH
PIDNS_OFFSET = CREATED_OFFSET + 8
MUTEX_OFFSET = 64
MUTEX_SPACE = 64
PRODUCER_LINE_OFFSET = MUTEX_OFFSET + MUTEX_SPACE  # 128
TAIL_OFFSET = PRODUCER_LINE_OFFSET
APPENDED_OFFSET = TAIL_OFFSET + 8
FREE_HEAD_OFFSET = APPENDED_OFFSET + 8  # read by every claim; not in the line pop persists (no store miss)
CONSUMER_LINE_OFFSET = PRODUCER_LINE_OFFSET + CACHE_LINE  # 192
HEAD_OFFSET = CONSUMER_LINE_OFFSET
POPPED_OFFSET = HEAD_OFFSET + 8
WAKE_LINE_OFFSET = CONSUMER_LINE_OFFSET + CACHE_LINE  # 256
FUTEX_OFFSET = WAKE_LINE_OFFSET
WAITERS_OFFSET = FUTEX_OFFSET + 4
RECOVERY_LINE_OFFSET = WAKE_LINE_OFFSET + CACHE_LINE  # 320
EPOCH_OFFSET = RECOVERY_LINE_OFFSET
DATA_OFFSET = HEADER_SIZE

# The static part written once at creation and checked at every open.
_STATIC = struct.Struct("<8sIIQII16sQQ")
assert _STATIC.size == MUTEX_OFFSET

# --------------------------------------------------------------------- record header
RECORD_ALIGNMENT = 32
RECORD_HEADER_LENGTH = 32
REC_POS_OFFSET = 0
REC_LENGTH_OFFSET = REC_POS_OFFSET + 8
REC_TYPE_OFFSET = REC_LENGTH_OFFSET + 4
REC_STATE_OFFSET = REC_TYPE_OFFSET + 2
REC_CRC_OFFSET = REC_STATE_OFFSET + 2
REC_PID_OFFSET = REC_CRC_OFFSET + 4
REC_TOKEN_OFFSET = REC_PID_OFFSET + 4
assert REC_TOKEN_OFFSET + 8 == RECORD_HEADER_LENGTH

TYPE_DATA = 0x0D47
TYPE_PAD = 0x0BAD
STATE_CLAIMED = 0xC1A1
STATE_COMMITTED = 0xC0DE

MIN_CAPACITY = 4096
MAX_CAPACITY = 1 << 40
MAX_RECORD_CAP = 1 << 30


def max_record_for(capacity: int) -> int:
    """Largest payload a ring of ``capacity`` data bytes accepts."""
    return min(capacity // 4 - RECORD_HEADER_LENGTH, MAX_RECORD_CAP)


def aligned_record_size(length: int) -> int:
    """Bytes a record with a ``length``-byte payload occupies in the ring."""
    return (RECORD_HEADER_LENGTH + length + RECORD_ALIGNMENT - 1) & ~(RECORD_ALIGNMENT - 1)


def record_offset(pos: int, capacity: int) -> int:
    """File/mapping offset of the header of the record at absolute ``pos``."""
    return DATA_OFFSET + (pos & (capacity - 1))


def payload_offset(pos: int, capacity: int) -> int:
    """File/mapping offset of the payload of the record at absolute ``pos``."""
    return DATA_OFFSET + (pos & (capacity - 1)) + RECORD_HEADER_LENGTH


def file_size(capacity: int) -> int:
    return HEADER_SIZE + capacity


class FileHeader(NamedTuple):
    magic: bytes
    version: int
    header_size: int
    capacity: int
    max_record: int
    flags: int
    ring_id: bytes
    created_ns: int
    pid_namespace: int


def pack_file_header(capacity: int, ring_id: bytes, created_ns: int, pid_namespace: int) -> bytes:
    """The whole header page of a new, empty ring (head = tail = 0, epoch 0)."""
    page = bytearray(HEADER_SIZE)
    _STATIC.pack_into(
        page,
        0,
        MAGIC,
        VERSION,
        HEADER_SIZE,
        capacity,
        max_record_for(capacity),
        0,
        ring_id,
        created_ns,
        pid_namespace,
    )
    return bytes(page)


def unpack_file_header(page: bytes) -> FileHeader:
    return FileHeader(*_STATIC.unpack_from(page, 0))


def c_defines() -> str:
    """The layout as C ``#define`` lines, compiled into the C helper."""
    names = [
        "HEADER_SIZE",
        "CACHE_LINE",
        "MUTEX_OFFSET",
        "MUTEX_SPACE",
        "TAIL_OFFSET",
        "APPENDED_OFFSET",
        "HEAD_OFFSET",
        "POPPED_OFFSET",
        "FREE_HEAD_OFFSET",
        "CONSUMER_LINE_OFFSET",
        "EPOCH_OFFSET",
        "RECOVERY_LINE_OFFSET",
        "FUTEX_OFFSET",
        "WAITERS_OFFSET",
        "DATA_OFFSET",
        "RECORD_ALIGNMENT",
        "RECORD_HEADER_LENGTH",
        "REC_POS_OFFSET",
        "REC_LENGTH_OFFSET",
        "REC_TYPE_OFFSET",
        "REC_STATE_OFFSET",
        "REC_CRC_OFFSET",
        "REC_PID_OFFSET",
        "REC_TOKEN_OFFSET",
        "TYPE_DATA",
        "TYPE_PAD",
        "STATE_CLAIMED",
        "STATE_COMMITTED",
    ]
    g = globals()
    return "".join(f"#define D_{n} {int(g[n])}u\n" for n in names)
