"""Enrichment: a stored row plus its device's context (node.registry), on its way to a sink."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

from node.registry import UNKNOWN, DeviceContext, Registry
from node.storage.source import RawRow

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


def enrich(raw: Sequence[RawRow], registry: Registry) -> tuple[list[Row], int]:
    """The rows with their context, and how many belong to devices missing from the registry."""
    contexts: dict[str, DeviceContext] = {}
    unknown = 0
    out: list[Row] = []
    for rowid, device_id, seq, ts, received_at, data in raw:
        ctx = contexts.get(device_id)
        if ctx is None:
            ctx = contexts[device_id] = registry.context(device_id)
        if ctx.type == UNKNOWN and registry.get(device_id) is None:
            unknown += 1
        out.append(Row(rowid, device_id, seq, ts, received_at, data, ctx))
    return out, unknown
