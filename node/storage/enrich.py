"""Enrichment: a stored row plus its device's context (node.registry), on its way to a sink.

A :class:`Batch` is what the tail loop hands a sink: the store rows read (rowid order),
each device's context, how many rows belong to devices missing from the registry, and
-- built when a sink asks for them -- the rows one by one as :class:`Row`.  A sink that
formats rows column by column (the lake, VictoriaMetrics in C) never pays for the
per-row objects.  :func:`read_column_batch` reads the rows in columns
(:class:`~node.storage.source.Columns`, the C reader) into a :class:`ColumnBatch`,
whose ``raw`` tuples are made only when a sink asks for them.
"""

from __future__ import annotations

import json
import logging
from array import array
from collections import Counter
from collections.abc import Sequence
from functools import cached_property
from operator import itemgetter
from typing import Any, NamedTuple

from node.registry import UNKNOWN, DeviceContext, Registry
from node.storage.source import Columns, RawRow, StoreLog

log = logging.getLogger("node.storage.enrich")

_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class Row(NamedTuple):
    rowid: int
    device_id: str
    seq: int
    ts: float | None
    received_at: float
    data_json: str  # the store's JSON text of data, as stored
    ctx: DeviceContext

    @property
    def data(self) -> Any:
        return json.loads(self.data_json)


def labels_json(ctx: DeviceContext) -> str:
    return _json(dict(ctx.labels)) if ctx.labels else "{}"


def contexts_of(counts: dict[str, int], registry: Registry) -> tuple[dict[str, DeviceContext], int]:
    """Each device's context, and how many of the counted rows belong to devices missing from the registry."""
    contexts: dict[str, DeviceContext] = {}
    unknown = 0
    for device_id, n in counts.items():
        ctx = contexts[device_id] = registry.context(device_id)
        if ctx.type == UNKNOWN and registry.get(device_id) is None:
            unknown += n
    return contexts, unknown


class Batch:
    """``count`` store rows, rowids ``first..last``, with their devices' context."""

    def __init__(
        self,
        count: int,
        first: int,
        last: int,
        contexts: dict[str, DeviceContext],
        unknown: int,
        raw: Sequence[RawRow],
    ) -> None:
        self.count = count
        self.first = first
        self.last = last
        self.contexts = contexts
        self.unknown = unknown
        self.raw = raw

    @cached_property
    def rows(self) -> list[Row]:
        ctx = self.contexts
        return [Row(r, d, s, t, at, data, ctx[d]) for r, d, s, t, at, data in self.raw]


class ColumnBatch(Batch):
    """A :class:`Batch` read in columns: ``cols``; ``raw`` (and ``rows``) built on first use."""

    def __init__(self, cols: Columns, registry: Registry) -> None:
        rowids = array("q", cols.rowid[:8] + cols.rowid[-8:])
        self.cols = cols
        self.count = cols.count
        self.first, self.last = rowids[0], rowids[-1]
        self.contexts, self.unknown = contexts_of(dict(zip(cols.devices, cols.counts, strict=True)), registry)

    @cached_property
    def raw(self) -> list[RawRow]:  # type: ignore[override]
        return self.cols.tuples()


_odd_logged = False


def read_column_batch(source: StoreLog, after: int, limit: int, registry: Registry) -> Batch | None:
    """:func:`read_batch` through the C reader where it is available (a :class:`ColumnBatch`);
    a batch it refuses (a row not of the store's types) is read by :func:`read_batch`."""
    if not source.columnar:
        return read_batch(source, after, limit, registry)
    try:
        cols = source.read_columns(after, limit)
    except ValueError as exc:
        global _odd_logged
        if not _odd_logged:
            _odd_logged = True
            log.warning(
                "the columnar reader refused store rows after %d (%s): reading them row by row", after, exc
            )
        return read_batch(source, after, limit, registry)
    return None if cols is None else ColumnBatch(cols, registry)


def read_batch(source: StoreLog, after: int, limit: int, registry: Registry) -> Batch | None:
    """Up to ``limit`` rows after ``after`` as a :class:`Batch`; None when there are none."""
    raw = source.read(after, limit)
    if not raw:
        return None
    return batch_of(raw, registry)


def batch_of(raw: Sequence[RawRow], registry: Registry) -> Batch:
    batch = Batch(len(raw), raw[0][0], raw[-1][0], {}, 0, raw)
    batch.contexts, batch.unknown = contexts_of(Counter(map(itemgetter(1), raw)), registry)
    return batch


def enrich(raw: Sequence[RawRow], registry: Registry) -> tuple[list[Row], int]:
    """The rows with their context, and how many belong to devices missing from the registry."""
    if not raw:
        return [], 0
    batch = batch_of(raw, registry)
    return batch.rows, batch.unknown
