"""The device registry: what the storage tier knows about each device (``NODE_DEVICE_REGISTRY``).

A registry maps ``device_id`` to its context -- ``type``, ``class``, ``region``,
``site``, ``lat``/``lon`` and free-form ``labels`` -- and the storage sinks add that
context (plus a coarse geohash of the position, :mod:`node.geohash`) to every
record on its way to them (:mod:`node.enrich`).  A device missing from the
registry is stored with ``type = UNKNOWN`` and empty context, never dropped.

Two file formats, chosen by suffix (examples in ``examples/devices.csv`` and
``examples/devices.json``):

* **CSV** (``.csv``): a header line, then one device per line.  Columns
  ``device_id`` (required), ``type``, ``class``, ``region``, ``site``, ``lat``,
  ``lon``; every other column is a label (an empty cell: no such label).  A
  ``labels`` column may also hold ``key=value;key=value`` pairs.
* **JSON** (``.json``): either a list of objects (each with ``device_id``) or an
  object ``{device_id: {...}}``; ``labels`` is an object of strings.

A file is accepted whole or not at all: the first bad entry raises
:class:`RegistryError` naming the file and the line.  :class:`RegistryWatcher`
re-reads a changed file (at most once per second) and keeps the registry it had
when the new file is bad, logging why, so a typo never changes what is stored.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from node import geohash
from node.errors import NodeError

UNKNOWN = "unknown"

_CORE = ("device_id", "type", "class", "region", "site", "lat", "lon", "labels")
_MAX_ID = 256  # characters of a device id / context value
_RELOAD_INTERVAL = 1.0  # s: a watcher looks at the file at most this often


class RegistryError(NodeError, ValueError):
    """A registry file cannot be used; the message names the file and the line."""


def _no_labels() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True)
class DeviceContext:
    device_id: str
    type: str
    class_: str
    region: str
    site: str
    lat: float | None
    lon: float | None
    geohash: str  # "" when no lat/lon
    labels: Mapping[str, str] = field(default_factory=_no_labels)


def unknown_context(device_id: str) -> DeviceContext:
    return DeviceContext(device_id, UNKNOWN, "", "", "", None, None, "")


class Registry:
    """An immutable ``device_id -> DeviceContext`` map."""

    def __init__(self, devices: Mapping[str, DeviceContext] | None = None, source: str = "") -> None:
        self._devices: dict[str, DeviceContext] = dict(devices or {})
        self.source = source

    @classmethod
    def load(cls, path: Path) -> Registry:
        """Read a CSV (``.csv``) or JSON (``.json``) registry; :class:`RegistryError` if bad."""
        suffix = path.suffix.lower()
        if suffix not in (".csv", ".json"):
            raise RegistryError(f"{path}: expected a .csv or .json device registry, got suffix {suffix!r}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{path}: cannot read the device registry: {exc}") from None
        if suffix == ".csv":
            return cls(_parse_csv(path, text), str(path))
        return cls(_parse_json(path, text), str(path))

    def get(self, device_id: str) -> DeviceContext | None:
        return self._devices.get(device_id)

    def context(self, device_id: str) -> DeviceContext:
        """The device's context; an unknown device gets ``type = UNKNOWN`` and empty fields."""
        found = self._devices.get(device_id)
        return unknown_context(device_id) if found is None else found

    def __len__(self) -> int:
        return len(self._devices)

    def __iter__(self) -> Iterator[DeviceContext]:
        return iter(self._devices.values())


# ---------------------------------------------------------------------- parsing
def _text(where: str, key: str, raw: object) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
        raise RegistryError(f"{where}: {key}: expected a string, got {raw!r}")
    value = str(raw).strip()
    if len(value) > _MAX_ID:
        raise RegistryError(f"{where}: {key}: expected at most {_MAX_ID} characters, got {len(value)}")
    return value


def _coordinate(where: str, key: str, raw: object, limit: float) -> float | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise RegistryError(f"{where}: {key}: expected a number, got {raw!r}")
    try:
        value = float(raw)
    except ValueError:
        raise RegistryError(f"{where}: {key}: expected a number, got {raw!r}") from None
    if not math.isfinite(value) or not -limit <= value <= limit:
        raise RegistryError(f"{where}: {key}: expected a number in -{limit:g}..{limit:g}, got {raw!r}")
    return value


def _context(where: str, entry: Mapping[str, Any], labels: dict[str, str]) -> DeviceContext:
    device_id = _text(where, "device_id", entry.get("device_id"))
    if not device_id:
        raise RegistryError(f"{where}: device_id: expected a non-empty device id")
    lat = _coordinate(where, "lat", entry.get("lat"), 90.0)
    lon = _coordinate(where, "lon", entry.get("lon"), 180.0)
    if (lat is None) != (lon is None):
        raise RegistryError(f"{where}: expected both lat and lon or neither, got lat={lat} lon={lon}")
    return DeviceContext(
        device_id=device_id,
        type=_text(where, "type", entry.get("type")) or UNKNOWN,
        class_=_text(where, "class", entry.get("class")),
        region=_text(where, "region", entry.get("region")),
        site=_text(where, "site", entry.get("site")),
        lat=lat,
        lon=lon,
        geohash="" if lat is None or lon is None else geohash.encode(lat, lon),
        labels=MappingProxyType(labels),
    )


def _add(devices: dict[str, DeviceContext], lines: dict[str, int], where: str, ctx: DeviceContext) -> None:
    if ctx.device_id in devices:
        raise RegistryError(
            f"{where}: device {ctx.device_id!r} is already listed at line {lines[ctx.device_id]}"
        )
    devices[ctx.device_id] = ctx


def _parse_csv(path: Path, text: str) -> dict[str, DeviceContext]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return {}
    except csv.Error as exc:
        raise RegistryError(f"{path}:1: {exc}") from None
    if "device_id" not in header:
        raise RegistryError(f"{path}:1: expected a header line with a device_id column, got {header!r}")
    if len(set(header)) != len(header) or "" in header:
        raise RegistryError(f"{path}:1: expected distinct, non-empty column names, got {header!r}")
    devices: dict[str, DeviceContext] = {}
    lines: dict[str, int] = {}
    try:
        for row in reader:
            line = reader.line_num
            where = f"{path}:{line}"
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise RegistryError(f"{where}: expected {len(header)} columns, got {len(row)}")
            entry = dict(zip(header, (cell.strip() for cell in row), strict=True))
            labels: dict[str, str] = {}
            for pair in filter(None, (p.strip() for p in entry.get("labels", "").split(";"))):
                key, sep, val = pair.partition("=")
                if not sep or not key.strip():
                    raise RegistryError(f"{where}: labels: expected key=value;key=value, got {pair!r}")
                labels[key.strip()] = _text(where, f"labels.{key.strip()}", val)
            for key, val in entry.items():
                if key not in _CORE and val:
                    labels[key] = _text(where, key, val)
            ctx = _context(where, entry, labels)
            _add(devices, lines, where, ctx)
            lines[ctx.device_id] = line
    except csv.Error as exc:
        raise RegistryError(f"{path}:{reader.line_num}: {exc}") from None
    return devices


def _json_line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _parse_json(path: Path, text: str) -> dict[str, DeviceContext]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from None
    if isinstance(doc, dict):
        entries = [
            (key, {**value, "device_id": key} if isinstance(value, dict) else value)
            for key, value in doc.items()
        ]
    elif isinstance(doc, list):
        entries = [(None, value) for value in doc]
    else:
        raise RegistryError(
            f"{path}:1: expected a list of devices or an object of devices, got {type(doc).__name__}"
        )
    # Line numbers: find each device's id in the text, in order (json keeps no positions).
    devices: dict[str, DeviceContext] = {}
    lines: dict[str, int] = {}
    search = 0
    for index, (key, entry) in enumerate(entries):
        label = key if key is not None else (entry.get("device_id") if isinstance(entry, dict) else None)
        line = 1
        if isinstance(label, str):
            found = text.find(json.dumps(label), search)
            if found >= 0:
                line = _json_line(text, found)
                search = found + 1
        where = f"{path}:{line} (device #{index + 1})"
        if not isinstance(entry, dict):
            raise RegistryError(f"{where}: expected an object, got {entry!r}")
        raw_labels = entry.get("labels") or {}
        if not isinstance(raw_labels, dict):
            raise RegistryError(f"{where}: labels: expected an object of strings, got {raw_labels!r}")
        labels = {str(k): _text(where, f"labels.{k}", v) for k, v in raw_labels.items()}
        unknown = sorted(set(entry) - set(_CORE))
        if unknown:
            raise RegistryError(f"{where}: unknown keys {unknown} (put free-form values under 'labels')")
        ctx = _context(where, entry, labels)
        _add(devices, lines, where, ctx)
        lines[ctx.device_id] = line
    return devices


# ---------------------------------------------------------------------- watching
class RegistryWatcher:
    """The current registry of a file, re-read when its mtime or size changes.

    ``path=None`` (no ``NODE_DEVICE_REGISTRY``): always the empty registry.  A file
    that cannot be read or parsed is logged (once per change) and the previous
    registry stays active; at start that means the empty registry.
    """

    def __init__(self, path: Path | None, log: logging.Logger | None = None) -> None:
        self.path = path
        self.log = log or logging.getLogger("node.registry")
        self._registry = Registry()
        self._stamp: tuple[int, int] | None = None
        self._checked = -math.inf
        self.errors = 0  # bad files refused since start
        self.loads = 0  # files accepted since start
        if path is not None:
            self._check(time.monotonic())

    def current(self) -> Registry:
        if self.path is not None:
            now = time.monotonic()
            if now - self._checked >= _RELOAD_INTERVAL:
                self._check(now)
        return self._registry

    def _check(self, now: float) -> None:
        assert self.path is not None
        self._checked = now
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError as exc:
            stamp = (-1, -1)
            if stamp != self._stamp:
                self.log.error("device registry %s: %s: keeping the previous registry", self.path, exc)
                self.errors += 1
            self._stamp = stamp
            return
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            registry = Registry.load(self.path)
        except RegistryError as exc:
            self.errors += 1
            self.log.error(
                "device registry refused: %s: keeping the previous registry (%d devices)",
                exc,
                len(self._registry),
            )
            return
        self.loads += 1
        self.log.info("device registry %s: %d devices", self.path, len(registry))
        self._registry = registry
