"""The device registry: what each device is (type, class, region, site, position).

A minimal stand-in implementing the agreed API (CSV files only); the storage
tier's full version replaces it.

::

    Registry.load(path) -> Registry          a CSV file; RegistryError naming the line
    registry.get(device_id) -> DeviceContext | None
    registry.context(device_id) -> DeviceContext   unknown devices: type = UNKNOWN
    len(registry), iter(registry)
    RegistryWatcher(path | None, log).current() -> Registry
        re-read when the file changes, at most once per second; a file that
        cannot be read or parsed keeps the previous registry (logged once).

CSV columns (a header line names them): ``device_id`` (required), ``type``,
``class``, ``region``, ``site``, ``lat``, ``lon``, ``geohash``; any other column
is a label.  Empty cells are ``UNKNOWN`` (text) or ``None`` (lat/lon); a missing
geohash is computed from lat/lon.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

from node.errors import NodeError

UNKNOWN: Final = "unknown"
_FIELDS: Final = ("device_id", "type", "class", "region", "site", "lat", "lon", "geohash")
_BASE32: Final = "0123456789bcdefghjkmnpqrstuvwxyz"
RELOAD_INTERVAL: Final = 1.0  # seconds between checks of the file


class RegistryError(NodeError, ValueError):
    """A registry file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class DeviceContext:
    device_id: str
    type: str
    class_: str
    region: str
    site: str
    lat: float | None
    lon: float | None
    geohash: str
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def geohash(lat: float, lon: float, precision: int = 9) -> str:
    """The standard base-32 geohash of a position."""
    lat_range, lon_range = [-90.0, 90.0], [-180.0, 180.0]
    out: list[str] = []
    bits, ch, even = 0, 0, True
    while len(out) < precision:
        rng, value = (lon_range, lon) if even else (lat_range, lat)
        mid = (rng[0] + rng[1]) / 2
        ch <<= 1
        if value >= mid:
            ch |= 1
            rng[0] = mid
        else:
            rng[1] = mid
        even = not even
        bits += 1
        if bits == 5:
            out.append(_BASE32[ch])
            bits, ch = 0, 0
    return "".join(out)


def _coordinate(path: Path, line: int, name: str, raw: str, limit: float) -> float | None:
    if not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        raise RegistryError(f"{path}:{line}: {name} expected a number, got {raw!r}") from None
    if not math.isfinite(value) or abs(value) > limit:
        raise RegistryError(
            f"{path}:{line}: {name} expected a number in [-{limit:g}, {limit:g}], got {raw!r}"
        )
    return value


class Registry:
    """Device contexts by id, read from one CSV file."""

    def __init__(self, contexts: Mapping[str, DeviceContext] | None = None) -> None:
        self._contexts: dict[str, DeviceContext] = dict(contexts or {})

    @classmethod
    def load(cls, path: Path) -> Registry:
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise RegistryError(f"{path}: cannot read: {exc}") from None
        if not rows:
            return cls()
        header = [name.strip() for name in rows[0]]
        if "device_id" not in header:
            raise RegistryError(f"{path}:1: expected a header with a device_id column, got {rows[0]!r}")
        contexts: dict[str, DeviceContext] = {}
        for line, row in enumerate(rows[1:], start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) > len(header):
                raise RegistryError(f"{path}:{line}: expected {len(header)} columns, got {len(row)}")
            cells = dict(zip(header, (cell.strip() for cell in row), strict=False))
            device_id = cells.get("device_id", "")
            if not device_id:
                raise RegistryError(f"{path}:{line}: empty device_id")
            if device_id in contexts:
                raise RegistryError(f"{path}:{line}: device {device_id!r} listed twice")
            lat = _coordinate(path, line, "lat", cells.get("lat", ""), 90)
            lon = _coordinate(path, line, "lon", cells.get("lon", ""), 180)
            gh = cells.get("geohash", "") or (
                geohash(lat, lon) if lat is not None and lon is not None else ""
            )
            labels = {k: v for k, v in cells.items() if k not in _FIELDS and k and v}
            contexts[device_id] = DeviceContext(
                device_id=device_id,
                type=cells.get("type") or UNKNOWN,
                class_=cells.get("class") or UNKNOWN,
                region=cells.get("region") or UNKNOWN,
                site=cells.get("site") or UNKNOWN,
                lat=lat,
                lon=lon,
                geohash=gh,
                labels=MappingProxyType(labels),
            )
        return cls(contexts)

    def get(self, device_id: str) -> DeviceContext | None:
        return self._contexts.get(device_id)

    def context(self, device_id: str) -> DeviceContext:
        found = self._contexts.get(device_id)
        if found is not None:
            return found
        return DeviceContext(device_id, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, None, None, "")

    def __len__(self) -> int:
        return len(self._contexts)

    def __iter__(self) -> Iterator[DeviceContext]:
        return iter(self._contexts.values())


class RegistryWatcher:
    """The registry of ``path`` (empty without one), re-read when the file changes."""

    def __init__(self, path: Path | None, log: logging.Logger | None = None) -> None:
        self.path = path
        self.log = log or logging.getLogger("node.registry")
        self._registry = Registry()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = -math.inf
        self._failed: str | None = None

    def current(self) -> Registry:
        if self.path is None:
            return self._registry
        now = time.monotonic()
        if now - self._checked < RELOAD_INTERVAL:
            return self._registry
        self._checked = now
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return self._registry
            registry = Registry.load(self.path)
        except (OSError, RegistryError) as exc:
            message = str(exc)
            if message != self._failed:  # once per distinct problem, not once a second
                self.log.error(
                    "device registry %s not (re)loaded, keeping %d devices: %s",
                    self.path,
                    len(self._registry),
                    message,
                )
                self._failed = message
            return self._registry
        self._stamp, self._failed = stamp, None
        self._registry = registry
        self.log.info("device registry %s: %d devices", self.path, len(registry))
        return registry
