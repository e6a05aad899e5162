"""CPU per row of the PostgreSQL sink's client side: store read + ``COPY`` text, C vs Python.

    python -m bench.investigations.pg_copy_format [--rows 100000] [--rounds 3]

Fills a SQLite store (contract 5's schema) with ``--rows`` rows of 100 registered devices
(``data`` as bench.sinks writes it: three numbers and a string), then reads it in
5,000-row batches and builds each batch's ``COPY`` text two ways: sqlite3 rows +
``postgres.copy_text`` (the Python path) and the C reader's columns + ``postgres.copy_data``
(``_pgcopy.c``).  Prints process CPU µs per row for each, per round, and checks both texts
have the same size.  No server: it measures what the sink process spends, not the server.
What it decided: docs/bench.md ("The PostgreSQL COPY text in C").
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from node.registry import DeviceContext, Registry
from node.storage.enrich import read_batch, read_column_batch
from node.storage.postgres import copy_data, copy_text
from node.storage.source import StoreLog
from tests.storage.test_storeread import make_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    devices = [f"dev-{i:03d}" for i in range(100)]
    ctx = ("thermo", "env", "eu-west", "paris", 48.85, 2.35, "u09tv", {"floor": "3"})
    registry = Registry({d: DeviceContext(d, *ctx) for d in devices})
    data = '{"temp":21.5,"hum":40,"bat":3.71,"state":"ok"}'
    t0 = 1_796_389_588.0
    rows = [(devices[i % 100], i // 100, t0 + i / 1e4, t0 + 0.5 + i / 1e4, data) for i in range(args.rows)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.sqlite3"
        make_store(path, rows)
        for rnd in range(args.rounds):
            sizes = {}
            for name, columnar in (("python", False), ("c", True)):
                source = StoreLog(path, columnar=columnar)
                assert source.open() and source.columnar == columnar
                cpu0, after, n, size = time.process_time(), 0, 0, 0
                while True:
                    read = read_column_batch if columnar else read_batch
                    batch = read(source, after, 5000, registry)
                    if batch is None:
                        break
                    chunks = copy_data(batch)[0] if columnar else copy_text(batch)
                    size += sum(len(c) for c in chunks)
                    after, n = batch.last, n + batch.count
                cpu = time.process_time() - cpu0
                source.close()
                sizes[name] = size
                print(f"round {rnd + 1}: {name:6s} {cpu / n * 1e6:5.2f} µs of CPU per row (read + COPY text)")
            assert sizes["python"] == sizes["c"], sizes


if __name__ == "__main__":
    main()
