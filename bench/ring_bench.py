"""Ring benchmark: ``python -m bench.ring_bench [--duration S] [--quick] [--micro]``.

Prints a markdown table: appends/s and MB/s for 64 B / 256 B / 1 KiB records,
1 / 2 / 4 producer processes, single-record and batched (64) appends, on each
backend, next to the raw limit measured in the same run with the same call pattern
and no ring logic:

* ``pmem`` (libpmem with ``PMEM_IS_PMEM_FORCE=1`` on /dev/shm): raw = the same bytes
  memcpy'd into a libpmem mapping and ``pmem_persist``-ed (per record / per batch);
* ``msync`` and ``mmap`` (a file on disk): raw = the same bytes copied into a shared
  mapping and msync'd (per record / per batch).

Then the idle CPU of a consumer blocked in ``Reader.wait`` and the wake-up latency
(append in one process -> read in the consumer process).  Speed is never asserted.

``--micro``: only µs per call of ``append_batch`` / ``append_packed`` / ``append`` against
``pmem_memcpy_persist`` of the same bytes, one process, warm mappings (no page
faults), interleaved rounds -- the stable view of the C and Python costs.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BATCH = 64
SIZES = (64, 256, 1024)
PRODUCERS = (1, 2, 4)


def _reexec_with_pmem_force() -> None:
    # libpmem reads PMEM_IS_PMEM_FORCE once per process: set it before it loads.
    if os.environ.get("PMEM_IS_PMEM_FORCE") != "1":
        os.environ["PMEM_IS_PMEM_FORCE"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "bench.ring_bench", *sys.argv[1:]])


# ---------------------------------------------------------------------- raw limits
def raw_rate(backend: str, directory: Path, size: int, batched: bool, duration: float) -> float:
    """Records/s of copy + persist with no ring logic, same call pattern as the ring."""
    from node.ring._native import lib
    from node.ring.backend import load_libpmem

    path = directory / f"raw-{backend}.bin"
    length = 256 << 20
    with open(path, "wb") as fh:
        fh.truncate(length)
        os.posix_fallocate(fh.fileno(), 0, length)  # no first-touch allocation in the timing
    payload = os.urandom(size)
    per = BATCH if batched else 1
    chunk = payload * per
    n = 0
    try:
        if backend == "pmem":
            loaded = load_libpmem()
            assert loaded is not None
            abi, pm = loaded
            abi.cdef("void *pmem_memcpy_persist(void *dest, const void *src, size_t len);", override=True)
            mlen = abi.new("size_t *")
            isp = abi.new("int *")
            base = pm.pmem_map_file(str(path).encode(), 0, 0, 0, mlen, isp)
            addr = abi.cast("char *", base)
            off = 0
            t0 = time.perf_counter()
            deadline = t0 + duration
            while time.perf_counter() < deadline:
                for _ in range(100):
                    if off + len(chunk) > length:
                        off = 0
                    pm.pmem_memcpy_persist(addr + off, chunk, len(chunk))
                    off += len(chunk)
                    n += per
            elapsed = time.perf_counter() - t0
            pm.pmem_unmap(base, length)
        else:
            fd = os.open(path, os.O_RDWR)
            mm = mmap.mmap(fd, length)
            from node.ring._native import ffi

            cbuf = ffi.from_buffer("char[]", mm)
            base_addr = int(ffi.cast("uintptr_t", cbuf))
            page = mmap.PAGESIZE
            off = 0
            t0 = time.perf_counter()
            deadline = t0 + duration
            while time.perf_counter() < deadline:
                for _ in range(10):
                    if off + len(chunk) > length:
                        off = 0
                    mm[off : off + len(chunk)] = chunk
                    start = off & ~(page - 1)
                    lib.iotring_msync(base_addr + start, off + len(chunk) - start)
                    off += len(chunk)
                    n += per
            elapsed = time.perf_counter() - t0
            ffi.release(cbuf)
            mm.close()
            os.close(fd)
    finally:
        path.unlink()
    return n / elapsed


# ---------------------------------------------------------------------- ring producers
def _producer(
    path: str, backend: str, capacity: int, size: int, batched: bool, duration: float, go: int, out: int
) -> None:
    from node.ring import Ring

    ring = Ring.open(path, capacity=capacity, backend=backend)
    payload = os.urandom(size)
    batch = [payload] * BATCH
    os.read(go, 1)
    n = 0
    calls = 0
    t0 = time.perf_counter()
    deadline = t0 + duration
    full = False
    while not full and time.perf_counter() < deadline:
        for _ in range(50):
            if batched:
                k = ring.append_batch(batch)
            else:
                k = int(ring.append(payload))
            if not k:
                full = True
                break
            n += k
            calls += 1
    elapsed = time.perf_counter() - t0
    ring.close()
    os.write(out, json.dumps({"n": n, "calls": calls, "elapsed": elapsed}).encode() + b"\n")


def ring_rate(
    backend: str, directory: Path, size: int, producers: int, batched: bool, duration: float, capacity: int
) -> dict[str, float]:
    """Total records/s of ``producers`` processes appending to one fresh ring."""
    from node.ring import Ring

    path = str(directory / f"bench-{backend}.ring")
    for suffix in ("", ".lock", ".consumer"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    Ring.open(path, capacity=capacity, backend=backend).close()
    fd = os.open(path, os.O_RDWR)
    os.posix_fallocate(fd, 0, os.fstat(fd).st_size)  # as for the raw file: blocks allocated up front
    os.close(fd)
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pids = []
    for _ in range(producers):
        pid = os.fork()
        if pid == 0:
            try:
                _producer(path, backend, capacity, size, batched, duration, go_r, out_w)
            finally:
                os._exit(0)
        pids.append(pid)
    time.sleep(0.2)  # let every producer open the ring
    os.write(go_w, b"g" * producers)
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(out_w)
    raw = b""
    while chunk := os.read(out_r, 65536):
        raw += chunk
    for fd in (go_r, go_w, out_r):
        os.close(fd)
    results = [json.loads(line) for line in raw.splitlines()]
    assert len(results) == producers, results
    total = sum(r["n"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    per_call_us = statistics.mean(r["elapsed"] / max(1, r["calls"]) for r in results) * 1e6
    os.unlink(path)
    return {"rate": total / elapsed, "per_call_us": per_call_us}


# ---------------------------------------------------------------------- consumer wake-up
def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def consumer_idle_and_wake(
    backend: str, directory: Path, idle_seconds: float, samples: int
) -> dict[str, Any]:
    from node.ring import Ring

    path = str(directory / f"wake-{backend}.ring")
    Ring.open(path, capacity=1 << 20, backend=backend).close()
    ready_r, ready_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ring = Ring.open(path, capacity=1 << 20, backend=backend)
            reader = ring.reader()
            os.write(ready_w, b"r")
            lat = []
            deadline = time.monotonic() + idle_seconds + samples * 0.05 + 30
            while len(lat) < samples and time.monotonic() < deadline:
                if reader.wait(1.0):
                    for rec in reader.read():
                        lat.append(time.monotonic_ns() - int(rec.payload))
                        reader.pop(rec.end)
            os.write(out_w, json.dumps(lat).encode())
        finally:
            os._exit(0)
    os.read(ready_r, 1)
    time.sleep(0.2)
    cpu0, t0 = _cpu_seconds(pid), time.monotonic()
    time.sleep(idle_seconds)
    idle_cpu = (_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    ring = Ring.open(path, capacity=1 << 20, backend=backend)
    for _ in range(samples):
        time.sleep(0.01)
        ring.append(str(time.monotonic_ns()).encode())
    os.waitpid(pid, 0)
    os.close(out_w)
    raw = b""
    while chunk := os.read(out_r, 1 << 20):
        raw += chunk
    for fd in (ready_r, ready_w, out_r):
        os.close(fd)
    ring.close()
    lat_us = sorted(x / 1000 for x in json.loads(raw))
    return {
        "idle_cpu_pct": idle_cpu * 100,
        "wake_p50_us": lat_us[len(lat_us) // 2],
        "wake_p99_us": lat_us[int(len(lat_us) * 0.99) - 1],
        "samples": len(lat_us),
    }


# ---------------------------------------------------------------------- warm micro-benchmark
def micro(size: int, rounds: int, reps: int = 400) -> list[tuple[str, float, float]]:
    """µs per call in warm mappings (pages resident, no first-touch faults), one process.

    Each round times ``reps`` calls of every variant in turn (median per call), so a
    shared machine's drift hits all of them alike; the best round is kept.  Returns
    (variant, ring µs, raw µs) with raw = pmem_memcpy_persist of the same bytes.
    """
    from array import array

    from node.ring import Ring
    from node.ring.backend import load_libpmem

    loaded = load_libpmem()
    assert loaded is not None
    abi, pm = loaded
    abi.cdef("void *pmem_memcpy_persist(void *dest, const void *src, size_t len);", override=True)
    directory = Path(tempfile.mkdtemp(prefix="ringmicro-", dir="/dev/shm"))
    length = 4 << 20
    payloads = [os.urandom(size) for _ in range(BATCH)]
    packed = b"".join(payloads)
    lens = array("I", map(len, payloads))
    try:
        raw_path = directory / "raw.bin"
        with open(raw_path, "wb") as fh:
            fh.truncate(length)
        mlen, isp = abi.new("size_t *"), abi.new("int *")
        base = pm.pmem_map_file(str(raw_path).encode(), 0, 0, 0, mlen, isp)
        addr = abi.cast("char *", base)
        state = {"off": 0}

        def raw(buf: bytes) -> int:
            if state["off"] + len(buf) > length:
                state["off"] = 0
            pm.pmem_memcpy_persist(addr + state["off"], buf, len(buf))
            state["off"] += len(buf)
            return 1

        ring = Ring.open(str(directory / "micro.ring"), capacity=length, backend="pmem")
        reader = ring.reader()

        def drain() -> None:
            while recs := reader.read(max_records=1 << 20, max_bytes=1 << 30):
                reader.pop(recs[-1].end)

        for _ in range(2):  # touch every page of both mappings first
            while ring.append_batch(payloads):
                pass
            drain()
            for _ in range(length // len(packed) + 1):
                raw(packed)

        def cycle() -> int:  # the consumer's side too: read it back and pop it (head persisted)
            if not ring.append(payloads[0]):
                return 0
            recs = reader.read()
            reader.pop(recs[-1].end)
            return 1

        def raw_cycle() -> int:  # raw: the record's copy+persist and one persisted 8-byte head store
            raw(payloads[0])
            pm.pmem_memcpy_persist(addr, head_word, 8)
            return 1

        head_word = bytes(8)
        variants = {
            "raw batch": lambda: raw(packed),
            "append_batch(list)": lambda: ring.append_batch(payloads),
            "append_packed": lambda: ring.append_packed(packed, lens),
            "raw single": lambda: raw(payloads[0]),
            "append(single)": lambda: int(ring.append(payloads[0])),
            "raw cycle": raw_cycle,
            "append+read+pop": cycle,
        }
        best: dict[str, float] = {}
        for _ in range(rounds):
            for name, fn in variants.items():
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter_ns()
                    k = fn()
                    t1 = time.perf_counter_ns()
                    if k:
                        times.append(t1 - t0)
                    else:
                        drain()
                us = statistics.median(times) / 1000
                best[name] = min(best.get(name, us), us)
        reader.close()
        ring.close()
        pm.pmem_unmap(base, length)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return [
        (f"append_batch {BATCH} x {size} B (list)", best["append_batch(list)"], best["raw batch"]),
        (f"append_packed {BATCH} x {size} B", best["append_packed"], best["raw batch"]),
        (f"append 1 x {size} B", best["append(single)"], best["raw single"]),
        (f"append+read+pop 1 x {size} B", best["append+read+pop"], best["raw cycle"]),
    ]


# ---------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=0.4, help="seconds per measurement (default 0.4)")
    ap.add_argument("--quick", action="store_true", help="256 B only, 1 and 2 producers")
    ap.add_argument("--rounds", type=int, default=3, help="alternating raw/ring rounds per cell (median)")
    ap.add_argument("--backends", default="pmem,msync,mmap")
    ap.add_argument("--disk-dir", default="/var/tmp", help="directory on a real disk for msync/mmap")
    ap.add_argument(
        "--micro",
        action="store_true",
        help="only warm single-process pmem timings: µs per call vs raw (stable when noisy)",
    )
    args = ap.parse_args()
    _reexec_with_pmem_force()
    if args.micro:
        print(f"# ring micro-benchmark: python -m bench.ring_bench {' '.join(sys.argv[1:])}")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        print(
            f"# {stamp}, pmem (PMEM_IS_PMEM_FORCE=1, /dev/shm), warm 4 MiB mappings,"
            f" best of {args.rounds} rounds of medians, load avg {os.getloadavg()[0]:.1f}"
        )
        print()
        print("| call | ring µs/call | raw µs/call | ring/raw (throughput) |")
        print("|---|---:|---:|---:|")
        for size in (64, 256, 1024):
            for name, ring_us, raw_us in micro(size, args.rounds):
                print(f"| {name} | {ring_us:.2f} | {raw_us:.2f} | {raw_us / ring_us:.2f} |", flush=True)
        return

    from node.ring.backend import load_libpmem

    backends = [b for b in args.backends.split(",") if b]
    if load_libpmem() is None:
        backends = [b for b in backends if b == "mmap"]
    sizes = (256,) if args.quick else SIZES
    producers = (1, 2) if args.quick else PRODUCERS
    shm = Path(tempfile.mkdtemp(prefix="ringbench-", dir="/dev/shm"))
    disk = Path(tempfile.mkdtemp(prefix="ringbench-", dir=args.disk_dir))
    print(f"# ring benchmark: python -m bench.ring_bench {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
        f"{args.duration}s x {args.rounds} rounds per cell, batch = {BATCH} records, "
        f"load avg {os.getloadavg()[0]:.1f}"
    )
    print()
    print(
        "| backend | mode | size | producers | appends/s | MB/s | µs/call"
        " | raw appends/s (1 proc) | ring/raw |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    try:
        for backend in backends:
            directory = shm if backend == "pmem" else disk
            capacity = 256 << 20
            for batched in (False, True):
                mode = f"batch {BATCH}" if batched else "single"
                for size in sizes:
                    for nprod in producers:
                        # raw and ring alternate, so a shared machine's drift hits both alike;
                        # medians over the rounds, ratio = median of the per-round ratios
                        rounds = []
                        for _ in range(args.rounds):
                            raw = raw_rate(backend, directory, size, batched, args.duration)
                            r = ring_rate(backend, directory, size, nprod, batched, args.duration, capacity)
                            rounds.append((r["rate"], r["per_call_us"], raw, r["rate"] / raw))
                        rate = statistics.median(x[0] for x in rounds)
                        per_call = statistics.median(x[1] for x in rounds)
                        raw = statistics.median(x[2] for x in rounds)
                        ratio = statistics.median(x[3] for x in rounds)
                        print(
                            f"| {backend} | {mode} | {size} | {nprod} | {rate:,.0f} | "
                            f"{rate * size / 1e6:,.1f} | {per_call:.2f} | {raw:,.0f} | {ratio:.2f} |",
                            flush=True,
                        )
        print()
        print("| backend | idle consumer CPU | wake p50 | wake p99 | samples |")
        print("|---|---:|---:|---:|---:|")
        for backend in backends:
            directory = shm if backend == "pmem" else disk
            w = consumer_idle_and_wake(backend, directory, 3.0 if not args.quick else 1.0, 200)
            print(
                f"| {backend} | {w['idle_cpu_pct']:.2f}% | {w['wake_p50_us']:.0f} µs | "
                f"{w['wake_p99_us']:.0f} µs | {w['samples']} |",
                flush=True,
            )
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)


if __name__ == "__main__":
    main()
