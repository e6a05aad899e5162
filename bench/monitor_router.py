"""Throughput of monitor + router against copying ring to ring in one process.

    python -m bench.monitor_router [--records 200000] [--durability process|power]

* baseline: one process reads the ingress ring in batches of 256, appends each
  batch to the fan-in ring (``append_batch``) and pops -- the ring work the two
  stages cannot avoid, without ZeroMQ, processes or acks;
* catch-up: the ingress ring is pre-filled, then router + monitor start; time from
  the first record reaching the fan-in ring until all have (the bench consumes the
  fan-in ring as the publisher would);
* live: router + monitor running, the bench appends as fast as it can (the web
  front's role) while consuming the fan-in ring; time until the last one arrived.

* latency: router + monitor running, one record appended every millisecond for
  2 s; time from append to arrival in the fan-in ring (p50/p99/max), i.e. what the
  two stages add to a message's way to the store when the node is not loaded.

Prints records/s and the ratios to the baseline measured in the same run.  Real
processes and ipc:// sockets in a temporary data dir; every wait is bounded.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from bench.stages import stage_env, start, stop
from node.record import pack_record
from node.ring import Ring

RING_BYTES = 64 << 20
TIMEOUT = 120.0


def envelopes(n: int) -> list[bytes]:
    now = time.time()
    return [pack_record(f"dev{i % 1000}", i, now, now, {"temp": 20.0 + i % 10, "n": i}) for i in range(n)]


def fill(ring: Ring, records: list[bytes]) -> None:
    done = 0
    deadline = time.monotonic() + TIMEOUT
    while done < len(records):
        done += ring.append_batch(records[done : done + 1024])
        if time.monotonic() > deadline:
            raise SystemExit("bench: ingress ring stayed full")


def baseline(records: list[bytes], d: Path, durability: str) -> float:
    src = Ring.open(d / "b-in.ring", capacity=RING_BYTES, durability=durability)
    dst = Ring.open(d / "b-out.ring", capacity=RING_BYTES, durability=durability)
    fill(src, records)
    reader = src.reader()
    pos = src.head
    started = time.perf_counter()
    moved = 0
    while moved < len(records):
        batch = reader.read(pos, max_records=256, max_bytes=1 << 20)
        payloads = [r.payload for r in batch]
        appended = 0
        while appended < len(payloads):
            appended += dst.append_batch(payloads[appended:])
        pos = batch[-1].end
        reader.pop(pos)
        moved += len(batch)
    elapsed = time.perf_counter() - started
    reader.close()
    src.close()
    dst.close()
    return len(records) / elapsed


def consume(fanin: Ring, total: int) -> tuple[float, float]:
    """Read and pop the fan-in ring until ``total`` records; (first arrival, last arrival) times."""
    reader = fanin.reader()
    pos = fanin.head
    got = 0
    first = 0.0
    deadline = time.monotonic() + TIMEOUT
    while got < total:
        batch = reader.read(pos, max_records=4096, max_bytes=8 << 20)
        if not batch:
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: only {got}/{total} records reached the fan-in ring")
            reader.wait(0.05)
            continue
        if not got:
            first = time.perf_counter()
        got += len(batch)
        pos = batch[-1].end
        reader.pop(pos)
    last = time.perf_counter()
    reader.close()
    return first, last


def stages_run(records: list[bytes], d: Path, durability: str, live: bool) -> float:
    data = d / ("live" if live else "catchup")
    data.mkdir()
    env = stage_env(data, durability, RING_BYTES, "monitor", "router")
    ingress = Ring.open(data / "ingress.ring", capacity=RING_BYTES, durability=durability)
    fanin = Ring.open(data / "fanin.ring", capacity=RING_BYTES, durability=durability)
    if not live:
        fill(ingress, records)
    procs = [start("router", env, d / "router.log"), start("monitor", env, d / "monitor.log")]
    try:
        if live:
            time.sleep(1.5)  # both stages up and connected
            feeder = threading.Thread(target=fill, args=(ingress, records), daemon=True)
            started = time.perf_counter()
            feeder.start()
            _, last = consume(fanin, len(records))
            feeder.join(timeout=TIMEOUT)
            return len(records) / (last - started)
        first, last = consume(fanin, len(records))
        return (len(records) - 1) / (last - first)
    finally:
        stop(procs)
        ingress.close()
        fanin.close()


def latency(d: Path, durability: str, count: int = 2000) -> list[float]:
    data = d / "latency"
    data.mkdir()
    env = stage_env(data, durability, RING_BYTES, "monitor", "router")
    ingress = Ring.open(data / "ingress.ring", capacity=RING_BYTES, durability=durability)
    fanin = Ring.open(data / "fanin.ring", capacity=RING_BYTES, durability=durability)
    procs = [start("router", env, d / "router.log"), start("monitor", env, d / "monitor.log")]
    sent: list[float] = []

    def feed() -> None:
        t0 = time.perf_counter()
        for i in range(count):
            delay = t0 + i * 0.001 - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent.append(time.perf_counter())
            while not ingress.append(pack_record("lat", i, None, 0.0, i)):
                time.sleep(0.001)

    try:
        time.sleep(1.5)  # both stages up and connected
        feeder = threading.Thread(target=feed, daemon=True)
        reader = fanin.reader()
        pos = fanin.head
        arrived: list[float] = []
        feeder.start()
        deadline = time.monotonic() + TIMEOUT
        while len(arrived) < count and time.monotonic() < deadline:
            batch = reader.read(pos, max_records=4096)
            if not batch:
                reader.wait(0.05)
                continue
            now = time.perf_counter()
            arrived.extend(now for _ in batch)
            pos = batch[-1].end
            reader.pop(pos)
        feeder.join(timeout=TIMEOUT)
        reader.close()
        return sorted(a - s for a, s in zip(arrived, sent, strict=False))
    finally:
        stop(procs)
        ingress.close()
        fanin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--durability", choices=("process", "power"), default="process")
    args = parser.parse_args()
    records = envelopes(args.records)
    with tempfile.TemporaryDirectory(prefix="bench-mr-") as tmp:
        d = Path(tmp)
        base = baseline(records, d, args.durability)
        catchup = stages_run(records, d, args.durability, live=False)
        live = stages_run(records, d, args.durability, live=True)
        lat = latency(d, args.durability)
    print(f"records={args.records} durability={args.durability} (payload ~{len(records[0])} bytes)")
    print(f"baseline ring->ring copy, one process : {base:12,.0f} records/s")
    print(
        f"monitor + router, catch-up            : {catchup:12,.0f} records/s  ({catchup / base:.2f}x "
        f"baseline)"
    )
    print(f"monitor + router, live                : {live:12,.0f} records/s  ({live / base:.2f}x baseline)")
    if lat:
        p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
        print(
            f"ingress -> fan-in latency at 1000/s   : p50 {p50 * 1e3:.2f} ms  p99 {p99 * 1e3:.2f} ms  max "
            f"{lat[-1] * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    main()
