"""The hub's routing rules, fed frames directly (a real Hub and SUB socket, no server)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from node import wire
from node.fanout.hub import Client, Hub, Selection
from node.record import pack_record

DEVICES = ["a", "b", "ab"]


def frames(device: str, seq: int, n: int = 0, epoch: int = 0) -> list[bytes]:
    """A published record; ``n`` = 0 everywhere never looks like a gap (no numbering)."""
    record = pack_record(device, seq, None, 1.0, seq)
    return wire.encode_published(wire.device_topic(device), b"R" * 16, 0, 1, record, epoch=epoch, n=n)


def with_hub(body: Callable[[Hub], None], queue_limit: int = 1_000_000) -> None:
    async def run() -> None:
        hub = Hub("inproc://fanout-test-nobody", hwm=1000, queue_limit=queue_limit)
        try:
            body(hub)
        finally:
            await hub.close()

    asyncio.run(run())


def streamed(client: Client) -> list[tuple[str, int]]:
    return [(m["device"], m["seq"]) for m in map(json.loads, client.queue)]


@settings(max_examples=150, deadline=None)
@given(
    events=st.lists(st.tuples(st.sampled_from(DEVICES), st.integers(0, 30)), max_size=120),
    cuts=st.lists(st.integers(1, 20), max_size=10),
)
def test_each_device_is_streamed_in_increasing_seq_without_repeats_whatever_the_batching(
    events: list[tuple[str, int]], cuts: list[int]
) -> None:
    def body(hub: Hub) -> None:
        ab = Client(Selection(False, frozenset({"a", "ab"})), 1_000_000)
        star = Client(Selection(True, frozenset()), 1_000_000)
        hub.add(ab)
        hub.add(star)
        batch_list = [frames(d, s) for d, s in events]
        i = 0
        for cut in cuts + [len(batch_list)]:
            hub.dispatch(batch_list[i : i + cut])
            i += cut
        hub.dispatch(batch_list[i:])
        # expected: a record passes iff its seq beats every earlier one of its device
        last: dict[str, int] = {}
        expected = []
        for d, s in events:
            if s > last.get(d, -1):
                last[d] = s
                expected.append((d, s))
        assert streamed(star) == expected
        assert streamed(ab) == [k for k in expected if k[0] in ("a", "ab")]

    with_hub(body)


def test_full_queue_marks_the_client_too_slow_once_and_forgets_it() -> None:
    def body(hub: Hub) -> None:
        slow = Client(Selection(False, frozenset({"a"})), 3)
        ok = Client(Selection(False, frozenset({"a"})), 100)
        hub.add(slow)
        hub.add(ok)
        hub.dispatch([frames("a", s) for s in range(1, 6)])
        assert slow.overflowed and not slow.queue  # its backlog is dropped at once
        assert [s for _, s in streamed(ok)] == [1, 2, 3, 4, 5]
        hub.dispatch([frames("a", 6)])
        assert not slow.queue and [s for _, s in streamed(ok)][-1] == 6
        hub.remove(slow)  # the endpoint's cleanup after the hub already forgot it: harmless

    with_hub(body)


def test_dedup_memory_is_dropped_when_nobody_follows_the_device() -> None:
    def body(hub: Hub) -> None:
        first = Client(Selection(False, frozenset({"a"})), 100)
        hub.add(first)
        hub.dispatch([frames("a", 5)])
        hub.remove(first)
        later = Client(Selection(False, frozenset({"a"})), 100)
        hub.add(later)
        hub.dispatch([frames("a", 3)])  # a new connection never saw seq 3: it is streamed
        assert streamed(later) == [("a", 3)]

    with_hub(body)


def test_heartbeats_and_records_of_unfollowed_devices_are_not_streamed() -> None:
    def body(hub: Hub) -> None:
        client = Client(Selection(False, frozenset({"a"})), 100)
        hub.add(client)
        hub.dispatch([wire.encode_heartbeat(b"R" * 16, 7), frames("b", 1), frames("a", 1)])
        assert streamed(client) == [("a", 1)]

    with_hub(body)


def test_a_jump_in_a_devices_numbers_closes_its_followers_naming_the_device_and_the_count() -> None:
    def body(hub: Hub) -> None:
        a = Client(Selection(False, frozenset({"a"})), 100)
        star = Client(Selection(True, frozenset()), 100)
        b = Client(Selection(False, frozenset({"b"})), 100)
        for client in (a, star, b):
            hub.add(client)
        hub.dispatch([frames("a", 1, n=1), frames("b", 1, n=1), frames("a", 2, n=2)])
        assert a.missed is None and streamed(a) == [("a", 1), ("a", 2)]
        hub.dispatch([frames("a", 5, n=5), frames("b", 2, n=2)])  # messages 3 and 4 of "a" never came
        for gone in (a, star):
            assert gone.missed == "missed 2 live messages of device 'a'" and not gone.queue
        assert b.missed is None and streamed(b) == [("b", 1), ("b", 2)]
        hub.dispatch([frames("b", 3, n=3), frames("a", 6, n=6)])
        assert streamed(b)[-1] == ("b", 3) and not a.queue and not star.queue  # closed ones get nothing more
        # A new follower of "a" starts a fresh check: n = 6, 7 are not a gap for it.
        later = Client(Selection(False, frozenset({"a"})), 100)
        hub.add(later)
        hub.dispatch([frames("a", 7, n=7)])
        assert later.missed is None and streamed(later) == [("a", 7)]

    with_hub(body)


def test_a_restarted_publisher_numbering_from_1_again_is_not_a_gap() -> None:
    def body(hub: Hub) -> None:
        a = Client(Selection(False, frozenset({"a"})), 100)
        hub.add(a)
        hub.dispatch([frames("a", 1, n=1, epoch=10), frames("a", 2, n=2, epoch=10)])
        hub.dispatch([frames("a", 3, n=1, epoch=11), frames("a", 4, n=2, epoch=11)])  # a new epoch
        assert a.missed is None and [s for _, s in streamed(a)] == [1, 2, 3, 4]
        hub.dispatch([frames("a", 5, n=4, epoch=11)])
        assert a.missed == "missed 1 live messages of device 'a'"

    with_hub(body)


def test_close_reason_of_a_gap_fits_a_close_frame_for_a_long_device_id() -> None:
    device = "é" * 100  # 200 UTF-8 bytes

    def body(hub: Hub) -> None:
        client = Client(Selection(False, frozenset({device})), 100)
        hub.add(client)
        hub.dispatch([frames(device, 1, n=1), frames(device, 2, n=9)])
        assert client.missed is not None and client.missed.startswith("missed 7 live messages of device")
        assert len(client.missed.encode()) <= 123

    with_hub(body)
