"""Time one ``ring.append_batch`` (one persist) per group size, on this machine's backend.

    python -m bench.investigations.front_persist [DIR]

Prints the backend and, for groups of 1/8/64/512 records of 100 bytes, the median
microseconds per append_batch call and per record (500 calls each, ring drained
between rounds), the CPU time per call (user + kernel, ``getrusage``: an msync's cost
to the other processes on the cores, beside its wall time), and the same call through
the commit thread (the hop's cost).
Results and what they decided: docs/front.md ("Thread or inline?").
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from node.record import pack_record
from node.ring import Ring
from node.ring.reader import Reader


def drain(ring: Ring, reader: Reader) -> None:
    pos = ring.head
    for _ in range(100_000):
        batch = reader.read(pos, max_records=65536, max_bytes=64 << 20)
        if not batch:
            break
        pos = batch[-1].end
    reader.pop(pos)


async def thread_hop(ring: Ring, reader: Reader, group: list[bytes]) -> float:
    loop = asyncio.get_running_loop()
    times = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        for _ in range(500):
            t0 = time.perf_counter()
            await loop.run_in_executor(pool, ring.append_batch, group)
            times.append(time.perf_counter() - t0)
            if ring.bytes_used > ring.capacity // 2:
                drain(ring, reader)
    return statistics.median(times) * 1e6


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="persist-"))
    for durability in ("power", "process"):
        path = root / f"measure-{durability}.ring"
        ring = Ring.open(path, capacity=64 << 20, durability=durability)
        reader = ring.reader()
        record = pack_record("device-0001", 1, 1.0, 1.0, {"v": "x" * 60})
        print(f"backend={ring.backend} durability={durability} record={len(record)} bytes")
        for size in (1, 8, 64, 512):
            group = [record] * size
            times = []
            before = resource.getrusage(resource.RUSAGE_SELF)
            for _ in range(500):
                t0 = time.perf_counter()
                n = ring.append_batch(group)
                times.append(time.perf_counter() - t0)
                assert n == size
                if ring.bytes_used > ring.capacity // 2:
                    drain(ring, reader)
            after = resource.getrusage(resource.RUSAGE_SELF)
            user = (after.ru_utime - before.ru_utime) / 500 * 1e6  # drains included (every ~2k calls)
            kernel = (after.ru_stime - before.ru_stime) / 500 * 1e6
            med = statistics.median(times) * 1e6
            print(
                f"  group {size:4d}: {med:8.1f} us per call, {med / size:7.2f} us per record;"
                f" CPU {user:.1f} us user + {kernel:.1f} us kernel per call"
            )
            drain(ring, reader)
        hop = asyncio.run(thread_hop(ring, reader, [record] * 8))
        print(f"  group    8 via the commit thread (run_in_executor): {hop:8.1f} us per call")
        reader.close()
        ring.close()
        path.unlink()


if __name__ == "__main__":
    main()
