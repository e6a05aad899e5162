"""node.gcpolicy against the real interpreter GC (in this process, restored after each test)."""

from __future__ import annotations

import asyncio
import gc
import sys
import time
import weakref
from collections.abc import Iterator

import pytest

from node.gcpolicy import QUIET_OBJECTS, GcPolicy


class _Node:
    """A small cyclic structure, like a connection's protocol <-> task <-> frame."""

    def __init__(self) -> None:
        self.me = self
        self.data = [self]


def _grow_to(factor: float, baseline: int) -> list[_Node]:
    """Live _Nodes until the allocated memory blocks reach ``factor`` x ``baseline``."""
    nodes: list[_Node] = []
    for _ in range(10_000):  # bounded: 10M nodes
        if sys.getallocatedblocks() >= factor * baseline:
            return nodes
        nodes.extend(_Node() for _ in range(1000))
    raise AssertionError(f"could not grow memory to {factor} x {baseline} blocks")


@pytest.fixture
def policy() -> Iterator[GcPolicy]:
    saved = gc.get_threshold()
    p = GcPolicy(check_every=1, floor=0)
    try:
        yield p
    finally:
        p.restore()
        gc.set_threshold(*saved)
        gc.collect()


def _full_collections() -> int:
    return int(gc.get_stats()[2]["collections"])


def test_connections_accepted_after_start_are_frozen_and_a_ramp_runs_no_full_pass(
    policy: GcPolicy,
) -> None:
    policy.start()
    frozen_at_start = gc.get_freeze_count()
    fulls = _full_collections()
    # A ramp: "connections" accepted after start-up, more live objects than survived
    # start-up (CPython's 25 % rule would then allow a full collection; memory blocks
    # grow 4x, past the safety net), and allocations that trigger automatic young
    # collections (each of which, under CPython's default threshold2, may escalate
    # to a full one).
    conns = _grow_to(4.2, sys.getallocatedblocks())
    n = len(conns)
    for _ in range(n // 1000):
        policy.note_garbage()  # connections began
    policy.tick()
    assert gc.get_freeze_count() >= frozen_at_start + n
    for _ in range(40):
        junk = [[i] for i in range(30_000)]  # lives through automatic young collections, then dies
        policy.tick()
        del junk
    # Memory grew 4x, but only by new connections: live memory, nothing to compact.
    assert policy.compactions == 0
    assert _full_collections() == fulls, "an automatic full collection ran"
    # Churn: those connections end (their cycles are garbage, still frozen) and new
    # ones take their place; once that doubled memory, a compaction reclaims the dead.
    probe = weakref.ref(conns[0])
    ramp_blocks = sys.getallocatedblocks()
    for _ in range(n // 1000):
        policy.note_garbage(ended=True)
    del conns
    policy.tick()
    assert policy.compactions == 0 and probe() is not None, "dead but frozen; memory has not doubled"
    replacements = _grow_to(2.05, ramp_blocks)
    policy.note_garbage()
    policy.tick()
    assert policy.compactions == 1
    assert probe() is None
    assert _full_collections() - fulls == policy.compactions
    assert replacements


def test_growth_to_four_times_compacts_even_without_ended_connections(policy: GcPolicy) -> None:
    policy.start()
    baseline = sys.getallocatedblocks()
    cycles = _grow_to(4.2, baseline)
    probe = weakref.ref(cycles[0])
    gc.freeze()
    del cycles
    assert sys.getallocatedblocks() >= 4 * baseline
    policy.tick()
    assert policy.compactions == 1
    assert probe() is None


def test_frozen_dead_cycles_are_reclaimed_once_memory_doubles(policy: GcPolicy) -> None:
    policy.start()
    baseline = sys.getallocatedblocks()
    cycles = _grow_to(2.5, baseline)
    probe = weakref.ref(cycles[0])
    gc.freeze()  # frozen while alive, like a connection's objects
    del cycles  # dead, but cyclic: reference counting cannot free them
    assert probe() is not None
    assert sys.getallocatedblocks() >= 2 * baseline
    policy.tick()  # no connection ended yet: garbage or a ramp? Not compacted below 4x
    assert policy.compactions == 0
    policy.note_garbage(ended=True)
    policy.tick()  # allocated blocks >= 2x the start-up count and a connection ended: compaction
    assert policy.compactions == 1
    assert probe() is None
    assert sys.getallocatedblocks() < 2 * baseline


def _young_collections() -> int:
    return int(gc.get_stats()[1]["collections"])


def test_a_clean_tick_freezes_without_collecting(policy: GcPolicy) -> None:
    """Steady traffic: no connection began or ended, so the tick only freezes (a young
    collection there cost 8-27 ms of stalled loop and found nothing)."""
    policy.start()
    young = _young_collections()
    cycle = _Node()
    probe = weakref.ref(cycle)
    del cycle  # young cyclic garbage, but nobody said so
    policy.tick()
    assert _young_collections() == young
    assert probe() is not None, "frozen, waiting for a compaction"
    policy.compact()
    assert probe() is None


def test_a_tick_after_note_garbage_collects_young_cycles_before_freezing(policy: GcPolicy) -> None:
    policy.start()
    young = _young_collections()
    cycle = _Node()
    probe = weakref.ref(cycle)
    del cycle  # e.g. a closed connection's protocol <-> transport <-> task
    policy.note_garbage()
    policy.tick()
    assert _young_collections() == young + 1
    assert probe() is None
    policy.tick()  # clean again: no collection
    assert _young_collections() == young + 1


def test_a_steady_frozen_set_is_never_compacted(policy: GcPolicy) -> None:
    policy.start()
    live = [_Node() for _ in range(10_000)]
    for _ in range(50):
        policy.tick()
    assert policy.compactions == 0
    assert len(live) == 10_000


def test_restore_gives_back_the_thresholds_and_unfreezes() -> None:
    saved = gc.get_threshold()
    p = GcPolicy()
    p.start()
    try:
        assert gc.get_threshold()[1] == saved[1]
        assert gc.get_threshold()[2] > 1_000_000
        assert gc.get_freeze_count() > 0
    finally:
        p.restore()
    assert gc.get_threshold() == saved
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"interval": 0}, "0"),
        ({"check_every": 0}, "0"),
        ({"growth": 1.0}, "1.0"),
        ({"floor": -1}, "-1"),
        ({"interval": 1.0, "idle_interval": 0.5}, "0.5"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(kwargs: dict[str, float], shown: str) -> None:
    with pytest.raises(ValueError, match=shown):
        GcPolicy(**kwargs)  # type: ignore[arg-type]


def test_quiet_ticks_back_off_to_the_idle_interval_and_a_busy_one_comes_back_at_once() -> None:
    saved = gc.get_threshold()
    p = GcPolicy(interval=0.25, idle_interval=2.0)
    p.start()
    try:
        sleeps = []
        for _ in range(5):  # nothing allocated between the ticks
            p.tick()
            sleeps.append(p.sleep)
        assert sleeps == [0.5, 1.0, 2.0, 2.0, 2.0]
        survivors = [_Node() for _ in range(QUIET_OBJECTS)]  # traffic: new objects that live on
        p.tick()
        assert p.sleep == 0.25
        p.tick()
        assert p.sleep == 0.5  # frozen by the busy tick: quiet again
        p.note_garbage()  # a connection begins
        assert p.sleep == 0.25
        p.tick()
        assert p.sleep == 0.25  # the dirty tick itself counts as busy
        assert len(survivors) == QUIET_OBJECTS
    finally:
        p.restore()
        gc.set_threshold(*saved)


def test_a_connection_after_a_quiet_spell_is_collected_within_one_interval() -> None:
    """run(): backed off to a long sleep, note_garbage() brings the next tick to
    ``interval`` from now (not the rest of the long sleep)."""
    saved = gc.get_threshold()
    p = GcPolicy(interval=0.05, idle_interval=5.0)
    ticks: list[float] = []
    tick = p.tick

    def counted() -> None:
        tick()
        ticks.append(time.monotonic())

    p.tick = counted  # type: ignore[method-assign]

    async def go() -> float:
        p.start()
        task = asyncio.get_running_loop().create_task(p.run())
        try:
            for _ in range(200):  # bounded: until backed off past 1 s (0.05 .. 1.6: ~3 s)
                if p.sleep > 1.0:
                    break
                await asyncio.sleep(0.05)
            assert p.sleep > 1.0, f"never backed off: sleep {p.sleep}"
            await asyncio.sleep(0.1)
            seen, noted = len(ticks), time.monotonic()
            p.note_garbage()
            for _ in range(100):
                if len(ticks) > seen:
                    return ticks[seen] - noted
                await asyncio.sleep(0.01)
            raise AssertionError("no tick within 1 s of note_garbage")
        finally:
            task.cancel()

    try:
        waited = asyncio.run(go())
        assert waited < 0.5, f"the tick came {waited:.2f} s after note_garbage"
    finally:
        p.restore()
        gc.set_threshold(*saved)
