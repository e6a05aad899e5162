"""Enrichment: a stored row plus its device's context (node.registry), on its way to a sink.

A :class:`Batch` is what the tail loop hands a sink: the store rows read (rowid order),
each device's context, how many rows belong to devices missing from the registry, and
-- built when a sink asks for them -- the rows one by one as :class:`Row`.  A sink that
formats rows column by column (the lake) or in SQL (VictoriaMetrics) never pays for
the per-row objects.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from functools import cached_property
from operator import itemgetter
from typing import Any, NamedTuple

from node.registry import UNKNOWN, DeviceContext, Registry
from node.storage.source import RawRow, StoreLog

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
