"""The device registry (node/registry.py) and the geohash (node/geohash.py): files in, contexts out."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from node import geohash
from node.registry import UNKNOWN, Registry, RegistryError, RegistryWatcher
from node.storage.enrich import enrich
from tests.support import REPO


def test_geohash_matches_the_reference_encodings() -> None:
    assert geohash.encode(57.64911, 10.40744, 11) == "u4pruydqqvj"  # the classic example
    assert geohash.encode(48.8566, 2.3522) == "u09tv"
    assert len(geohash.encode(-33.8688, 151.2093)) == geohash.PRECISION == 5
    with pytest.raises(ValueError, match="latitude"):
        geohash.encode(91, 0)


@pytest.mark.parametrize("name", ["devices.csv", "devices.json"])
def test_example_registries_load_with_context_labels_and_geohash(name: str) -> None:
    registry = Registry.load(REPO / "examples" / name)
    sensor = registry.get("sensor-1")
    assert sensor is not None
    assert (sensor.type, sensor.class_, sensor.region, sensor.site) == ("thermo", "env", "eu-west", "paris-1")
    assert (sensor.lat, sensor.lon, sensor.geohash) == (48.8566, 2.3522, "u09tv")
    assert dict(sensor.labels) == {"floor": "3", "room": "301", "owner": "facilities"}
    gateway = registry.context("gateway-9")
    assert (gateway.lat, gateway.geohash) == (None, "")
    assert {c.device_id for c in registry} >= {"sensor-1", "truck-7", "gateway-9"}
    assert len(registry) == len(list(registry))


def test_unknown_device_gets_type_unknown_and_empty_context() -> None:
    ctx = Registry().context("ghost")
    assert (ctx.device_id, ctx.type, ctx.class_, ctx.region, ctx.site, ctx.geohash) == (
        "ghost",
        UNKNOWN,
        "",
        "",
        "",
        "",
    )
    assert Registry().get("ghost") is None


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("device_id,type,lat,lon\na,t,1,2\nb,t,north,2\n", 3, "lat: expected a number"),
        ("device_id,type,lat,lon\na,t,1,2\nb,t,1\n", 3, "expected 4 columns"),
        ("device_id,type,lat,lon\na,t,1,2\n\na,t,1,2\n", 4, "already listed at line 2"),
        ("device_id,type,lat,lon\na,t,95,2\n", 2, "-90..90"),
        ("device_id,type,lat,lon\na,t,1,\n", 2, "both lat and lon"),
        ("type,lat\n", 1, "device_id column"),
    ],
)
def test_bad_csv_is_refused_naming_file_and_line(tmp_path: Path, text: str, line: int, what: str) -> None:
    path = tmp_path / "r.csv"
    path.write_text(text)
    with pytest.raises(RegistryError) as err:
        Registry.load(path)
    assert f"{path}:{line}:" in str(err.value)
    assert what in str(err.value)


def test_bad_json_is_refused_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text('[\n {"device_id": "a", "type": "t"},\n {"device_id": "b", "lat": "x", "lon": 1}\n]\n')
    with pytest.raises(RegistryError, match=r"r\.json:3 \(device #2\): lat: expected a number"):
        Registry.load(path)
    path.write_text('{"a": {"type": "t",}}')
    with pytest.raises(RegistryError, match=r"r\.json:1: not JSON"):
        Registry.load(path)
    path.write_text('{"a": {"type": "t", "color": "red"}}')
    with pytest.raises(RegistryError, match="unknown keys.*labels"):
        Registry.load(path)
    with pytest.raises(RegistryError, match="expected a .csv or .json"):
        Registry.load(tmp_path / "r.yaml")


def test_watcher_reloads_a_changed_file_and_keeps_the_old_registry_on_a_bad_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "r.csv"
    path.write_text("device_id,type\na,thermo\n")
    watcher = RegistryWatcher(path, logging.getLogger("test.registry"))
    assert watcher.current().context("a").type == "thermo"

    path.write_text("device_id,type,lat,lon\na,meter,1,oops\n")  # bad: refused, old one stays
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    deadline = time.monotonic() + 5
    while watcher.errors == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        watcher.current()
    assert watcher.errors == 1
    assert watcher.current().context("a").type == "thermo"
    assert "r.csv:2: lon: expected a number" in caplog.text and "keeping the previous registry" in caplog.text

    path.write_text("device_id,type\na,meter\nb,thermo\n")
    deadline = time.monotonic() + 5
    while watcher.current().context("a").type != "meter" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert watcher.current().context("a").type == "meter" and len(watcher.current()) == 2


def test_watcher_without_a_file_is_the_empty_registry() -> None:
    assert len(RegistryWatcher(None).current()) == 0


def test_enrich_counts_rows_of_unknown_devices_and_keeps_them() -> None:
    registry = Registry.load(REPO / "examples" / "devices.csv")
    raw = [
        (1, "sensor-1", 0, None, 1.0, "{}"),
        (2, "ghost", 0, None, 1.0, "{}"),
        (3, "ghost", 1, None, 1.0, "1"),
    ]
    rows, unknown = enrich(raw, registry)
    assert unknown == 2
    assert [r.ctx.type for r in rows] == ["thermo", UNKNOWN, UNKNOWN]
    assert [r.rowid for r in rows] == [1, 2, 3]
