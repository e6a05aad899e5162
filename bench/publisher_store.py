"""Throughput of publisher + store against the store's own work done in-process.

    python -m bench.publisher_store [--records 200000] [--durability process|power]

* baseline: one process decodes the envelopes and writes them with ``SqliteSink``
  in batches of 1000 (the work the store cannot avoid);
* catch-up: the fan-in ring is pre-filled, then publisher + store start; time until
  the publisher has popped everything (every record durable in SQLite + confirmed);
* live: publisher + store running, the bench appends as fast as it can (the
  router's role); time from the first append until the ring is empty again.

Prints records/s for each and the ratios to the baseline measured in the same run.
Real processes and sockets (ipc:// in a temporary data dir); every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.stages import stage_env, start, stop
from node.record import pack_record, unpack_record
from node.ring import Ring
from node.sinks.sqlite import SqliteSink

RING_BYTES = 64 << 20


def envelopes(n: int) -> list[bytes]:
    now = time.time()
    return [pack_record(f"dev{i % 1000}", i, now, now, {"temp": 20.0 + i % 10, "n": i}) for i in range(n)]


def baseline(records: list[bytes], path: Path, durability: str) -> float:
    sink = SqliteSink(path, durability)
    sink.open()
    ring_id = b"b" * 16
    started = time.perf_counter()
    for i in range(0, len(records), 1000):
        sink.write([unpack_record(p) for p in records[i : i + 1000]], ring_id, i + 1000)
    elapsed = time.perf_counter() - started
    sink.close()
    return len(records) / elapsed


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_empty(ring: Ring, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while ring.depth:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {ring.depth} records still in the fan-in ring")
        time.sleep(0.005)


def fill(ring: Ring, records: list[bytes], timeout: float) -> None:
    i = 0
    deadline = time.monotonic() + timeout
    while i < len(records):
        n = ring.append_batch(records[i : i + 256])
        i += n
        if n == 0:
            if time.monotonic() > deadline:
                raise SystemExit("timed out appending: the ring stayed full")
            time.sleep(0.001)


def catch_up(records: list[bytes], root: Path, durability: str) -> tuple[float, float, float]:
    data = root / "catchup"
    data.mkdir()
    env = stage_env(data, durability, RING_BYTES, "publisher", "store")
    pub = start("publisher", env, root / "catchup.log")
    try:
        deadline = time.monotonic() + 15
        while not (data / "fanin.ring").exists():
            if time.monotonic() > deadline:
                raise SystemExit("publisher did not create the ring")
            time.sleep(0.02)
        ring = Ring.open(data / "fanin.ring", capacity=RING_BYTES, durability="process")
        fill(ring, records, 60)
        time.sleep(1.0)  # nobody subscribes or fetches: the publisher does nothing meanwhile
        pub_cpu = cpu_seconds(pub.pid)
        started = time.perf_counter()
        store = start("store", env, root / "catchup.log")
        wait_empty(ring, 300)
        elapsed = time.perf_counter() - started
        pub_cpu = cpu_seconds(pub.pid) - pub_cpu
        store_cpu = cpu_seconds(store.pid)
        stop([store])
        ring.close()
    finally:
        stop([pub])
    n = len(records)
    return n / elapsed, pub_cpu / n * 1e6, store_cpu / n * 1e6


def live(records: list[bytes], root: Path, durability: str) -> tuple[float, float, float]:
    data = root / "live"
    data.mkdir()
    env = stage_env(data, durability, RING_BYTES, "publisher", "store")
    procs = [start("publisher", env, root / "live.log"), start("store", env, root / "live.log")]
    try:
        deadline = time.monotonic() + 15
        while not (data / "fanin.ring").exists():
            if time.monotonic() > deadline:
                raise SystemExit("publisher did not create the ring")
            time.sleep(0.02)
        ring = Ring.open(data / "fanin.ring", capacity=RING_BYTES, durability="process")
        time.sleep(1.0)  # let the store connect and learn the ring
        before = [cpu_seconds(p.pid) for p in procs]
        started = time.perf_counter()
        fill(ring, records, 300)
        wait_empty(ring, 300)
        elapsed = time.perf_counter() - started
        used = [cpu_seconds(p.pid) - b for p, b in zip(procs, before, strict=True)]
        ring.close()
    finally:
        stop(procs)
    n = len(records)
    return n / elapsed, used[0] / n * 1e6, used[1] / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--durability", choices=("process", "power"), default="power")
    args = parser.parse_args()
    records = envelopes(args.records)
    with tempfile.TemporaryDirectory(prefix="bench-ps-") as tmp:
        root = Path(tmp)
        base = baseline(records, root / "baseline.sqlite3", args.durability)
        cu, cu_pub, cu_store = catch_up(records, root, args.durability)
        lv, lv_pub, lv_store = live(records, root, args.durability)
    print(f"records={args.records} durability={args.durability} ({os.cpu_count()} CPUs)")
    print(f"baseline  in-process decode + SqliteSink.write:  {base:8.0f} rec/s  ({1e6 / base:5.1f} us/rec)")
    print(
        f"catch-up  publisher + store, ring pre-filled:     {cu:8.0f} rec/s  ({cu / base:.2f} x baseline)"
        f"  CPU us/rec: store {cu_store:.1f}, publisher {cu_pub:.1f}"
    )
    print(
        f"live      publisher + store, appending meanwhile: {lv:8.0f} rec/s  ({lv / base:.2f} x baseline)"
        f"  CPU us/rec: publisher {lv_pub:.1f}, store {lv_store:.1f}"
    )


if __name__ == "__main__":
    main()
