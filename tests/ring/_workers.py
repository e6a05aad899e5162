"""Child processes for the ring crash tests: ``python -m tests.ring._workers ROLE ...``.

producer PATH BACKEND PRODUCER_ID REPORT SEED DIE_RATE
    appends batches of (producer id, counter) records forever; after every append
    that returned, writes the last appended counter as one line to REPORT.  With
    probability DIE_RATE per append it instead stops inside the append (test hook)
    and SIGKILLs itself.
consumer PATH BACKEND LOG
    reads, logs every record as "pos producer counter" to LOG, then pops; forever
    (pausing now and then, so the ring fills up).
reader_stalls PATH BACKEND LOG
    reads every record, pops the first half, writes the positions of the rest to
    LOG, then hangs (to be killed between read and pop).
claimer PATH BACKEND STAGE READY
    claims one record and stops as if killed mid-append (STAGE 0: header only,
    1: payload + checksum without commit), touches READY, then sleeps.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import sys
import time

from node.ring import Ring

_HDR = struct.Struct("<IQI")  # producer id, counter, filler length


def make_payload(producer: int, counter: int) -> bytes:
    flen = (counter * 7919 + producer * 31) % 300
    return _HDR.pack(producer, counter, flen) + bytes([(counter + producer) & 0xFF]) * flen


def parse_payload(payload: bytes) -> tuple[int, int]:
    """(producer, counter); AssertionError if the payload is not exactly what was sent."""
    producer, counter, flen = _HDR.unpack_from(payload)
    assert payload == make_payload(producer, counter), f"damaged payload for {producer}/{counter}"
    assert flen == len(payload) - _HDR.size
    return producer, counter


def producer(path: str, backend: str, producer_id: int, report: str, seed: int, die_rate: float) -> None:
    rng = random.Random(seed)
    ring = Ring.open(path, capacity=1 << 16, backend=backend)
    fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    counter = 0
    deadline = time.monotonic() + 120  # bounded even if the test forgets to kill us
    while time.monotonic() < deadline:
        size = rng.choice((1, 1, 2, 5, 16))
        batch = [make_payload(producer_id, counter + i) for i in range(size)]
        if die_rate and rng.random() < die_rate:
            # Die exactly inside an append: holding the mutex, after the claim, or
            # after writing the payloads but before the commit marker.
            ring._append_partial(batch, rng.choice((-1, 0, 1)))
            os.kill(os.getpid(), signal.SIGKILL)
        n = ring.append(batch[0]) if size == 1 else ring.append_batch(batch)
        if n:
            counter += int(n)
            os.write(fd, b"%d\n" % (counter - 1))
        else:
            time.sleep(0.0005)


def consumer(path: str, backend: str, log: str) -> None:
    ring = Ring.open(path, capacity=1 << 16, backend=backend)
    reader = ring.reader()
    rng = random.Random(os.getpid())
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        recs = reader.read(ring.head, max_records=64)
        if not recs:
            reader.wait(0.01)
            continue
        lines = []
        for r in recs:
            p, c = parse_payload(r.payload)
            lines.append(b"%d %d %d\n" % (r.pos, p, c))
        os.write(fd, b"".join(lines))
        if rng.random() < 0.05:
            time.sleep(0.03)  # fall behind now and then: the ring fills, producers see "full"
        reader.pop(recs[-1].end)


def reader_stalls(path: str, backend: str, log: str) -> None:
    """Reads everything, logs it, pops the first half, then hangs before the next pop."""
    ring = Ring.open(path, capacity=1 << 16, backend=backend)
    reader = ring.reader()
    recs = reader.read(ring.head, max_records=1000)
    reader.pop(recs[len(recs) // 2 - 1].end)
    with open(log, "w") as fh:
        fh.write(" ".join(str(r.pos) for r in recs[len(recs) // 2 :]))
    time.sleep(60)


def claimer(path: str, backend: str, stage: int, ready: str) -> None:
    ring = Ring.open(path, capacity=1 << 16, backend=backend)
    assert ring._append_partial([make_payload(99, 0)], stage) == 1
    open(ready, "w").close()
    time.sleep(60)


if __name__ == "__main__":
    role, args = sys.argv[1], sys.argv[2:]
    if role == "producer":
        producer(args[0], args[1], int(args[2]), args[3], int(args[4]), float(args[5]))
    elif role == "consumer":
        consumer(args[0], args[1], args[2])
    elif role == "reader_stalls":
        reader_stalls(args[0], args[1], args[2])
    elif role == "claimer":
        claimer(args[0], args[1], int(args[2]), args[3])
    else:
        raise SystemExit(f"unknown role {role!r}")
