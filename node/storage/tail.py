"""A storage sink process: tail the SQLite store, enrich, write, keep the cursor with the data.

The interface a destination implements::

    class TailSink(ABC):
        name: str                       # "postgres", "victoria", "lake": metrics label, cursor key
        def open(self) -> None          # connect, create the schema; SinkDown if unreachable
        def cursor(self) -> int          # rowid to resume after (0: from the first row)
        def read(self, source, after, limit, registry) -> Batch | None
                                         # the next rows after rowid `after` (default: read + enrich;
                                         # a sink may read them in its own shape, e.g. columns)
        def write(self, batch)           # hand over a batch (rowid order) ending at rowid batch.last
        def idle(self) -> None           # nothing new to read (a buffering sink may flush)
        durable: int                     # rowid through which everything is durable there
        def close(self) -> None

A sink's rule: **its rows and its cursor become durable together, or its rewrite
after a crash is idempotent** (PostgreSQL and the lake: one transaction / one
commit; VictoriaMetrics: samples of the same series and timestamp are
deduplicated, so a rewrite stores nothing twice).  Rows arrive exactly once in
the SQLite store, so with that rule every row is exactly once in every sink.

:func:`run` is the loop of a sink process: it never exits because the destination
is down or slow -- it logs, counts ``iotnode_errors_total{stage=<sink>, reason}``,
backs off (0.5 s doubling to 5 s) and reconnects, resuming at the destination's
cursor -- so a configured sink never stops the node (honcho would stop every
process if one exited).  The store and the publisher never wait for it: its lag
(``iotnode_sink_lag_records`` / ``_seconds``) grows and shrinks instead.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod

from node.errors import NodeError
from node.metrics import (
    ERRORS,
    SINK_LAG_RECORDS,
    SINK_LAG_SECONDS,
    SINK_REGISTRY_DEVICES,
    SINK_REGISTRY_RELOADS,
    SINK_ROWS,
    SINK_UNKNOWN_DEVICES,
    SINK_WRITE_SECONDS,
)
from node.registry import Registry, RegistryWatcher
from node.storage.enrich import Batch, read_batch
from node.storage.source import StoreLog

POLL = 0.1  # s: wait when the sink has read every stored row
STORE_WAIT = 0.5  # s: wait for the store file to appear
BACKOFF_MIN = 0.5  # s: first wait after the destination failed
BACKOFF_MAX = 5.0
LAG_INTERVAL = 0.5  # s: how often the lag gauges are refreshed


class SinkDown(NodeError):
    """The destination cannot be reached or refused a write; the loop retries. ``reason`` labels it."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class TailSink(ABC):
    name: str = "sink"
    #: True: the sink observes ``iotnode_sink_write_seconds`` itself (its durable write happens
    #: outside :meth:`write`, e.g. in a thread); False: the loop times :meth:`write`.
    times_its_writes: bool = False

    def __init__(self) -> None:
        self.durable = 0

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def cursor(self) -> int: ...

    def read(self, source: StoreLog, after: int, limit: int, registry: Registry) -> Batch | None:
        """Up to ``limit`` rows after rowid ``after`` (None: none yet), enriched with ``registry``."""
        return read_batch(source, after, limit, registry)

    @abstractmethod
    def write(self, batch: Batch) -> None: ...

    def idle(self) -> None:  # noqa: B027 -- optional hook
        """Called when every stored row has been handed over (a buffering sink flushes when due)."""

    @abstractmethod
    def close(self) -> None: ...

    def flush(self) -> None:  # noqa: B027 -- optional hook
        """Make everything handed over durable (at a clean stop); a no-op for unbuffered sinks."""


class Tail:
    """The loop state of one sink process (separate from :func:`run` so tests and the bench drive it)."""

    def __init__(
        self,
        sink: TailSink,
        source: StoreLog,
        registry: RegistryWatcher,
        batch_rows: int,
        log: logging.Logger,
    ) -> None:
        self.sink = sink
        self.source = source
        self.registry = registry
        self.batch_rows = batch_rows
        self.log = log
        self.connected = False
        self.pos = 0  # rowid of the last row handed to the sink
        self.backoff = BACKOFF_MIN
        self.lag_at = 0.0
        self.beyond_logged = False
        self._registry_seen = (0, 0)
        self.rows_metric = SINK_ROWS.labels(sink=sink.name)
        self.unknown_metric = SINK_UNKNOWN_DEVICES.labels(sink=sink.name)
        self.write_seconds = SINK_WRITE_SECONDS.labels(sink=sink.name)
        self.lag_records = SINK_LAG_RECORDS.labels(sink=sink.name)
        self.lag_seconds = SINK_LAG_SECONDS.labels(sink=sink.name)

    def connect(self) -> None:
        self.sink.open()
        self.pos = self.sink.durable = self.sink.cursor()
        self.connected = True
        self.backoff = BACKOFF_MIN
        self.log.info("%s: connected, resuming after store rowid %d", self.sink.name, self.pos)

    def step(self) -> float:
        """One step; returns how long to wait before the next (0: more to do now)."""
        if not self.source.open():
            return STORE_WAIT
        try:
            if not self.connected:
                self.connect()
            wait = self._move()
        except SinkDown as exc:
            ERRORS.labels(stage=self.sink.name, reason=exc.reason).inc()
            self.log.warning("%s: %s: retrying in %.1f s", self.sink.name, exc, self.backoff)
            self.sink.close()
            self.connected = False
            wait, self.backoff = self.backoff, min(self.backoff * 2, BACKOFF_MAX)
        except sqlite3.Error as exc:
            ERRORS.labels(stage=self.sink.name, reason="store_read").inc()
            self.log.warning("%s: reading the SQLite store failed: %s: retrying", self.sink.name, exc)
            self.source.close()
            return STORE_WAIT
        try:
            self.update_lag()
        except sqlite3.Error:
            self.source.close()
        return wait

    def _move(self) -> float:
        registry = self.registry.current()
        batch = self.sink.read(self.source, self.pos, self.batch_rows, registry)
        if batch is None:
            if self.pos > self.source.last_rowid() and not self.beyond_logged:
                self.beyond_logged = True
                ERRORS.labels(stage=self.sink.name, reason="cursor_beyond_store").inc()
                self.log.error(
                    "%s: its cursor (store rowid %d) is beyond the store's last row %d: was the store"
                    " recreated? Waiting; reset the sink's cursor to refill it",
                    self.sink.name,
                    self.pos,
                    self.source.last_rowid(),
                )
            before = self.sink.durable
            self.sink.idle()
            self._count(before)
            return POLL
        self._registry_metrics(len(registry))
        if batch.unknown:
            self.unknown_metric.inc(batch.unknown)
        before = self.sink.durable
        started = time.monotonic()
        self.sink.write(batch)
        if self.sink.durable != before and not self.sink.times_its_writes:
            self.write_seconds.observe(time.monotonic() - started)
        self.pos = batch.last
        self._count(before)
        return 0.0 if batch.count == self.batch_rows else POLL / 4

    def _count(self, before: int) -> None:
        # Rows made durable = rowids passed (the store never deletes, so rowids are dense).
        if self.sink.durable > before:
            self.rows_metric.inc(self.sink.durable - before)

    def _registry_metrics(self, devices: int) -> None:
        seen = (self.registry.loads, self.registry.errors)
        if seen != self._registry_seen:
            SINK_REGISTRY_RELOADS.labels(sink=self.sink.name, result="loaded").inc(
                seen[0] - self._registry_seen[0]
            )
            SINK_REGISTRY_RELOADS.labels(sink=self.sink.name, result="refused").inc(
                seen[1] - self._registry_seen[1]
            )
            self._registry_seen = seen
        SINK_REGISTRY_DEVICES.labels(sink=self.sink.name).set(devices)

    def update_lag(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.lag_at < LAG_INTERVAL:
            return
        self.lag_at = now
        durable = self.sink.durable
        last = self.source.last_rowid()
        self.lag_records.set(max(0, last - durable))
        oldest = self.source.received_at_after(durable) if last > durable else None
        self.lag_seconds.set(0.0 if oldest is None else max(0.0, time.time() - oldest))

    def close(self) -> None:
        try:
            if self.connected:
                try:
                    self.sink.flush()
                except SinkDown as exc:
                    self.log.warning("%s: final flush failed: %s", self.sink.name, exc)
        finally:
            self.sink.close()
            self.source.close()


def run(
    sink: TailSink, source: StoreLog, registry: RegistryWatcher, batch_rows: int, stop: threading.Event
) -> None:
    log = logging.getLogger(f"node.storage.{sink.name}")
    tail = Tail(sink, source, registry, batch_rows, log)
    try:
        while not stop.is_set():
            wait = tail.step()
            if wait:
                stop.wait(wait)
    finally:
        tail.close()
    log.info("%s: stopped after store rowid %d", sink.name, sink.durable)
