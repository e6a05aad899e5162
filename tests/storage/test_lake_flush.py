"""The lake flushes by time under steady load too, not only when its tail is idle."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq

from node.registry import Registry
from node.storage.enrich import Batch, batch_of
from node.storage.lake import LakeSink


def _batch(first: int, n: int) -> Batch:
    now = time.time()
    raw = [(first + i, "dev-1", first + i, now, now, json.dumps({"v": i})) for i in range(n)]
    return batch_of(raw, Registry())


def test_a_write_after_flush_seconds_flushes_without_the_sink_ever_being_idle(tmp_path: Path) -> None:
    sink = LakeSink(tmp_path / "lake", flush_rows=1_000_000, flush_seconds=0.2)
    sink.open()
    sink.write(_batch(1, 10))
    assert sink.durable == 0  # neither threshold reached yet
    time.sleep(0.25)
    sink.write(_batch(11, 10))  # a busy tail: more rows, no idle() in between
    assert sink.durable == 20
    files = list((tmp_path / "lake").glob("date=*/type=*/*.parquet"))
    assert sum(pq.read_metadata(f).num_rows for f in files) == 20
    sink.close()
