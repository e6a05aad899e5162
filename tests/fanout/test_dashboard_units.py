"""The dashboard's pieces without a server: which contexts a token sees, the
registry stand-in (node/registry.py) and its watcher, NODE_DEVICE_REGISTRY."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import Settings
from node.errors import ConfigError
from node.fanout.dashboard import visible_devices
from node.registry import UNKNOWN, Registry

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


def test_device_registry_variable_must_name_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text(CSV)
    assert Settings.from_env({"NODE_DEVICE_REGISTRY": str(path)}).device_registry == path
    assert Settings.from_env({}).device_registry is None
    with pytest.raises(ConfigError, match="NODE_DEVICE_REGISTRY.*expected an existing file"):
        Settings.from_env({"NODE_DEVICE_REGISTRY": str(tmp_path / "missing.csv")})
