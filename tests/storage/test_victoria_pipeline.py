"""The VictoriaMetrics sink sends a batch while the next one is read and formatted.

A batch counts as durable -- and its cursor is saved -- only after VictoriaMetrics
acknowledged it, which the sink learns when it hands over the next batch (or is idle,
or flushes); a write that failed in flight commits nothing and surfaces as ``SinkDown``.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from bench.servers.storage import VmServer
from node.registry import Registry, RegistryWatcher
from node.storage.enrich import read_batch
from node.storage.source import StoreLog
from node.storage.tail import SinkDown, Tail
from node.storage.victoria import VictoriaSink
from tests.storage.conftest import StoreFiller


def _store(tmp_path: Path, rows: int) -> StoreLog:
    filler = StoreFiller(tmp_path / "store.sqlite3", devices=3, prefix=f"pipe{tmp_path.name[-6:]}-")
    filler.write(rows)
    filler.close()
    source = StoreLog(tmp_path / "store.sqlite3")
    assert source.open()
    return source


def _write_seconds_count() -> float:
    value = REGISTRY.get_sample_value("iotnode_sink_write_seconds_count", {"sink": "victoria"})
    return value or 0.0


def _saved(cursor_file: Path) -> int:
    return int(json.loads(cursor_file.read_text())["position"])


def test_a_batch_is_durable_and_its_cursor_saved_once_acknowledged_when_the_next_is_handed_over(
    vm: VmServer, tmp_path: Path
) -> None:
    source = _store(tmp_path, 30)
    sink = VictoriaSink(vm.url, tmp_path / "victoria.cursor")
    sink.open()
    assert sink.cursor() == 0
    first = read_batch(source, 0, 10, Registry({}))
    second = read_batch(source, 10, 10, Registry({}))
    assert first is not None and second is not None
    observed = _write_seconds_count()
    sink.write(first)
    assert sink.durable == 0 and not sink.cursor_file.exists()  # in flight
    assert _write_seconds_count() == observed  # nothing durable yet: no durable write timed
    sink.write(second)
    assert sink.durable == first.last == _saved(sink.cursor_file)
    sink.idle()
    assert sink.durable == second.last == _saved(sink.cursor_file)
    assert _write_seconds_count() == observed + 2  # one durable write (POST + cursor file) per batch
    sink.idle()  # nothing in flight: nothing changes
    assert sink.durable == second.last
    sink.close()
    source.close()
    vm.flush()
    prefix = f"pipe{tmp_path.name[-6:]}-"
    seqs = vm.export(f'{{__name__="unknown_iotnode_seq", device_id=~"{prefix}.*"}}')
    assert sum(len(s["values"]) for s in seqs) == 20


def test_a_write_that_fails_in_flight_commits_nothing_and_raises_sink_down(tmp_path: Path) -> None:
    source = _store(tmp_path, 20)
    with socket.socket() as listener:  # accepts, then closes without an HTTP answer
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        sink = VictoriaSink(url, tmp_path / "victoria.cursor")
        observed = _write_seconds_count()
        batch = read_batch(source, 0, 10, Registry({}))
        assert batch is not None
        sink.write(batch)
        conn, _ = listener.accept()
        conn.close()
        with pytest.raises(SinkDown):
            sink.flush()
    assert sink.durable == 0 and not sink.cursor_file.exists()
    assert _write_seconds_count() == observed  # a failed write is not a durable write
    sink.flush()  # the failed write is gone: nothing left to commit
    sink.close()
    source.close()


def test_the_tail_loop_counts_one_durable_write_per_batch_not_two(vm: VmServer, tmp_path: Path) -> None:
    """The sink times its own writes (``times_its_writes``): the loop, which times ``write()``
    for other sinks, must not observe them a second time."""
    source = _store(tmp_path, 30)
    registry = tmp_path / "devices.csv"
    registry.write_text("device_id,type,class,region,site,lat,lon\n")
    sink = VictoriaSink(vm.url, tmp_path / "victoria.cursor")
    tail = Tail(sink, source, RegistryWatcher(registry), 10, logging.getLogger("test"))
    observed = _write_seconds_count()
    for _ in range(50):
        if sink.durable == 30:
            break
        tail.step()
    tail.close()
    assert sink.durable == 30 == _saved(sink.cursor_file)
    assert _write_seconds_count() == observed + 3
