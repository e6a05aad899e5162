"""Bytes the embedded store writes per record, by page size and WAL checkpoint budget.

    python -m bench.investigations.store_wal [--devices 10000] [--seconds 40] [DIR]

Feeds the real :class:`node.sinks.sqlite.SqliteSink` the load of the C10K scenario
without the network: ``--devices`` devices × 1 msg/s, one commit (with its cursor)
per 20 ms of records (the store's MAX_DELAY at 10k msg/s: 200 records), each device's
``seq`` counting up, the devices' order within a second shuffled.  It counts the bytes
the process hands to ``write``/``pwrite`` (``wchar`` of /proc/self/io: WAL frames
and checkpoints, before the page cache) per record, per 10 s of simulated load,
for the configuration the sink ships with and for the old one (4 KiB pages, SQLite's
1000-page autocheckpoint).  ``synchronous`` stays FULL (the power durability), so the
run also shows the CPU per record.  What it decided: ``node/sinks/sqlite.py``
(PAGE_SIZE, WAL_CHECKPOINT_BYTES) and docs/bench.md ("The store's write amplification").
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
import time
from pathlib import Path

from node.record import Record
from node.sinks import sqlite as store


def wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar")


def run(
    directory: Path, page_size: int, checkpoint_bytes: int, devices: int, seconds: int
) -> dict[str, object]:
    """One configuration in a fresh file; returns bytes per record overall and per 10 s."""
    saved = store.PAGE_SIZE, store.WAL_CHECKPOINT_BYTES
    store.PAGE_SIZE, store.WAL_CHECKPOINT_BYTES = page_size, checkpoint_bytes
    try:
        sink = store.SqliteSink(directory / f"store-{page_size}-{checkpoint_bytes}.sqlite3", "power")
        sink.open()
    finally:
        store.PAGE_SIZE, store.WAL_CHECKPOINT_BYTES = saved
    per_commit = max(1, devices // 50)  # 20 ms of devices × 1 msg/s
    total = devices * seconds
    data = {"temp": 21.5, "hum": 40.5, "battery": 3.7, "status": "ok"}
    order = list(range(devices))
    rng = random.Random(1)
    seqs = [0] * devices
    ring_id = b"\x01" * 16
    now = time.time()
    written = 0
    cursor = 0
    marks: list[int] = []
    start_bytes = wchar()
    t0 = time.perf_counter()
    while written < total:
        batch = []
        for _ in range(min(per_commit, total - written)):
            if written % devices == 0:
                rng.shuffle(order)
            d = order[written % devices]
            batch.append(Record(f"device-{d:05d}", seqs[d], now, now, data))
            seqs[d] += 1
            written += 1
        cursor += 1
        sink.write(batch, ring_id, cursor)
        if written % (devices * 10) < per_commit:
            marks.append(wchar() - start_bytes)
    elapsed = time.perf_counter() - t0
    total_bytes = wchar() - start_bytes
    sink.close()
    per_window = [round((b - a) / (devices * 10)) for a, b in zip([0, *marks[:-1]], marks, strict=True)]
    return {
        "page_size": page_size,
        "checkpoint_mib": checkpoint_bytes / 2**20,
        "bytes_per_record": round(total_bytes / total),
        "per_10s": per_window,
        "us_per_record": round(elapsed / total * 1e6, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", nargs="?", help="directory on the disk to measure (default: one in /var/tmp)")
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--seconds", type=int, default=40, help="simulated seconds of load")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp", prefix="iotnode-store-wal-") as tmp:
        configs = [
            ("before: 4 KiB pages, 1000-page checkpoint", 4096, 4096 * 1000),
            (
                f"shipped: {store.PAGE_SIZE} B pages, {store.WAL_CHECKPOINT_BYTES >> 20} MiB WAL",
                store.PAGE_SIZE,
                store.WAL_CHECKPOINT_BYTES,
            ),
        ]
        base = None
        per_commit = max(1, args.devices // 50)
        print(f"{args.devices} devices x 1 msg/s, {args.seconds} s, one commit per {per_commit} records")
        for name, page, ckpt in configs:
            r = run(Path(tmp), page, ckpt, args.devices, args.seconds)
            base = base or r["bytes_per_record"]
            ratio = r["bytes_per_record"] / base  # type: ignore[operator]
            print(
                f"{name:48s} {r['bytes_per_record']:6d} B/record ({ratio:.2f}x)"
                f"  per 10 s: {r['per_10s']}  {r['us_per_record']} us/record"
            )
        # the page size really is what the file has
        for path in Path(tmp).glob("*.sqlite3"):
            db = sqlite3.connect(path)
            print(f"  {path.name}: page_size {db.execute('PRAGMA page_size').fetchone()[0]}")
            db.close()


if __name__ == "__main__":
    main()
