"""The dashboard's pieces without a server: which contexts a token sees, the
registry stand-in (node/registry.py) and its watcher, NODE_DEVICE_REGISTRY."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from node.config import Settings
from node.errors import ConfigError
from node.fanout.dashboard import visible_devices
from node.registry import UNKNOWN, Registry, RegistryError, RegistryWatcher, geohash

CSV = "device_id,type,class,region,site,lat,lon,owner\na-1,pump,actuator,south,p1,48.1,11.5,ops\nb-2,,,,,,,\n"


def test_a_star_token_sees_the_registry_and_a_list_token_exactly_its_ids(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text(CSV)
    registry = Registry.load(path)
    assert [d["device_id"] for d in visible_devices(registry, frozenset({"*"}))] == ["a-1", "b-2"]
    assert len(visible_devices(registry, frozenset({"*"}), limit=1)) == 1
    listed = visible_devices(registry, frozenset({"a-1", "zz-9"}))
    assert [d["device_id"] for d in listed] == ["a-1", "zz-9"]
    assert listed[0]["labels"] == {"owner": "ops"} and listed[0]["class"] == "actuator"
    assert listed[1]["type"] == UNKNOWN and listed[1]["lat"] is None


def test_registry_fills_unknowns_computes_geohash_and_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text(CSV)
    registry = Registry.load(path)
    b = registry.context("b-2")
    assert (b.type, b.class_, b.site, b.lat, b.geohash) == (UNKNOWN, UNKNOWN, UNKNOWN, None, "")
    assert registry.get("a-1").geohash == geohash(48.1, 11.5) and geohash(57.64911, 10.40744)[:5] == "u4pru"
    assert registry.get("nope") is None and len(registry) == 2
    path.write_text("device_id,lat\nx,91\n")
    with pytest.raises(RegistryError, match=r"r.csv:2: lat expected a number in \[-90, 90\]"):
        Registry.load(path)
    path.write_text("device_id\nx\nx\n")
    with pytest.raises(RegistryError, match="listed twice"):
        Registry.load(path)


def test_watcher_rereads_a_changed_file_and_keeps_the_old_registry_on_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "r.csv"
    path.write_text(CSV)
    watcher = RegistryWatcher(path, logging.getLogger("test.registry"))
    assert len(watcher.current()) == 2
    path.write_text("device_id,lat\nx,not-a-number\n")
    watcher._checked = float("-inf")  # skip the once-a-second wait
    with caplog.at_level(logging.ERROR, "test.registry"):
        assert len(watcher.current()) == 2
    assert "keeping 2 devices" in caplog.text and "lat expected a number" in caplog.text
    path.write_text("device_id\nonly-1\n")
    watcher._checked = float("-inf")
    assert [c.device_id for c in watcher.current()] == ["only-1"]
    assert len(RegistryWatcher(None).current()) == 0


def test_device_registry_variable_must_name_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text(CSV)
    assert Settings.from_env({"NODE_DEVICE_REGISTRY": str(path)}).device_registry == path
    assert Settings.from_env({}).device_registry is None
    with pytest.raises(ConfigError, match="NODE_DEVICE_REGISTRY.*expected an existing file"):
        Settings.from_env({"NODE_DEVICE_REGISTRY": str(tmp_path / "missing.csv")})
