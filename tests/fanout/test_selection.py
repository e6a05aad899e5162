"""Which devices a stream request may follow: pure checks, no server."""

from __future__ import annotations

import pytest

from node.fanout.hub import MAX_DEVICES, Selection, StreamRefused, select_devices

CLAIM = frozenset({"a", "b"})
STAR = frozenset({"*"})


def test_requested_devices_inside_the_claim_are_selected() -> None:
    assert select_devices(["a", "b", "a"], CLAIM) == Selection(False, frozenset({"a", "b"}))


def test_star_request_with_star_claim_follows_everything() -> None:
    assert select_devices(["*"], STAR) == Selection(True, frozenset())
    assert select_devices(["x", "*"], STAR) == Selection(True, frozenset())


def test_star_claim_allows_any_named_device() -> None:
    assert select_devices(["anything"], STAR) == Selection(False, frozenset({"anything"}))


def test_device_outside_the_claim_is_refused_with_403_naming_it() -> None:
    with pytest.raises(StreamRefused) as info:
        select_devices(["a", "zz"], CLAIM)
    assert info.value.status == 403 and "'zz'" in info.value.reason


def test_star_request_without_star_claim_is_refused_with_403() -> None:
    with pytest.raises(StreamRefused) as info:
        select_devices(["*"], CLAIM)
    assert info.value.status == 403


def test_no_device_is_refused_with_400() -> None:
    with pytest.raises(StreamRefused) as info:
        select_devices([], STAR)
    assert info.value.status == 400 and "device=" in info.value.reason


@pytest.mark.parametrize("bad", ["", "a\0b", "x" * 300])
def test_unusable_device_id_is_refused_with_400(bad: str) -> None:
    with pytest.raises(StreamRefused) as info:
        select_devices([bad], STAR)
    assert info.value.status == 400
    assert len(info.value.reason) < 200  # a huge id is not echoed whole


def test_too_many_devices_are_refused_with_400_giving_the_limit() -> None:
    with pytest.raises(StreamRefused) as info:
        select_devices([f"d{i}" for i in range(MAX_DEVICES + 1)], STAR)
    assert info.value.status == 400 and str(MAX_DEVICES) in info.value.reason
