"""The fanout behind the real publisher stage: fan-in ring -> publisher -> fanout -> client."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from node.auth import issue_client_token
from node.record import pack_record
from node.ring import Ring
from tests.fanout.conftest import SECRET, TIMEOUT, keys, nothing_more, private_node, receive
from tests.support import Processes, node_env, wait_for_port, wait_until

DEVICES = 7
FOLLOWED = ["dev0", "dev3"]


def envelope(i: int) -> bytes:
    return pack_record(f"dev{i % DEVICES}", i, float(i), 1_700_000_000.0 + i, {"i": i})


class Node:
    """publisher + fanout on a private data dir, no store: the publisher never pops,
    so a restarted publisher republishes everything (at-least-once, as after a crash)."""

    def __init__(self, data_dir: Path, processes: Processes) -> None:
        self.data_dir, self.processes = data_dir, processes
        self.env = node_env(data_dir, NODE_JWT_SECRET=SECRET)
        self.port = int(self.env["NODE_FANOUT_PORT"])
        self.start("publisher")
        self.start("fanout")
        wait_for_port(self.port)
        path = data_dir / "fanin.ring"
        wait_until(path.exists, 15, what="the publisher to create the fan-in ring")
        self.ring = Ring.open(path, capacity=int(self.env["NODE_FANIN_RING_BYTES"]), durability="process")

    def start(self, name: str) -> None:
        self.processes.start(name, f"node.workers.{name}", self.env, self.data_dir)

    def append(self, start: int, stop: int) -> None:
        payloads = [envelope(i) for i in range(start, stop)]
        assert self.ring.append_batch(payloads) == len(payloads)

    def url(self) -> str:
        token = issue_client_token(SECRET, FOLLOWED)
        return f"ws://127.0.0.1:{self.port}/v1/stream?device=dev0&device=dev3&token={token}"


@pytest.fixture
def node() -> Iterator[Node]:
    with private_node(Node, lambda n: n.ring.close()) as n:
        yield n


def metric(node: Node, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{node.port}/metrics", timeout=TIMEOUT).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    raise AssertionError(f"{name} not served")


def followed(start: int, stop: int) -> list[tuple[str, int]]:
    return [(f"dev{i % DEVICES}", i) for i in range(start, stop) if f"dev{i % DEVICES}" in FOLLOWED]


async def first_live(node: Node, ws: Any, start: int) -> tuple[list[tuple[str, int]], int]:
    """Append one record of each device at a time until the client has a frame of
    every followed device: each device's subscription reaches the publisher on its
    own, so one device can be live a batch or more before the other."""
    i = start
    got: list[tuple[str, int]] = []
    for _ in range(200):
        node.append(i, i + DEVICES)  # one record of each device, so one of dev0 and one of dev3
        i += DEVICES
        try:
            while True:
                got += keys([json.loads(await asyncio.wait_for(ws.recv(), 0.1))])
        except TimeoutError:
            pass
        if {d for d, _ in got} >= set(FOLLOWED):
            return got, i
    raise AssertionError(f"the client never received a live record of every followed device: {got}")


def since_live(got: list[tuple[str, int]], start: int, stop: int) -> list[tuple[str, int]]:
    """The followed records in [start, stop) from each device's first received one on."""
    first = {d: min(s for dev, s in got if dev == d) for d in FOLLOWED}
    return [k for k in followed(start, stop) if k[1] >= first[k[0]]]


def test_client_streams_from_the_real_publisher_without_duplicates_across_ring_dups_and_its_restart(
    node: Node,
) -> None:
    async def scenario() -> None:
        async with connect(node.url(), open_timeout=TIMEOUT, compression=None) as ws:
            got, nxt = await first_live(node, ws, 0)
            node.append(nxt, nxt + 140)
            nxt += 140
            # records before a device's first frame were published while its subscription was on its way
            expected = since_live(got, 0, nxt)
            got += keys(await receive(ws, len(expected) - len(got)))
            assert got == expected

            # A router restart can put records into the fan-in ring twice: streamed once.
            node.append(nxt - 70, nxt)
            node.append(nxt, nxt + 70)
            nxt += 70
            got += keys(await receive(ws, len(followed(nxt - 70, nxt))))
            assert got == since_live(got, 0, nxt)
            assert metric(node, "iotnode_fanout_duplicates_total") == len(followed(nxt - 140, nxt - 70))

            node.processes.kill("publisher", signal.SIGKILL)
            node.start("publisher")  # its live stream starts at the newest record: nothing old again
            more, nxt2 = await first_live(node, ws, nxt)
            node.append(nxt2, nxt2 + 140)
            end = nxt2 + 140
            expected_more = since_live(more, nxt, end)
            more += keys(await receive(ws, len(expected_more) - len(more)))
            await nothing_more(ws, 0.5)
            assert more == expected_more
        assert min(s for _, s in more) >= nxt, "a record from before the restart was streamed again"
        for device in FOLLOWED:
            per_device = [s for d, s in got + more if d == device]
            assert per_device == sorted(set(per_device)), f"{device}: duplicate or out of order"

    asyncio.run(asyncio.wait_for(scenario(), 90))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not node.processes.log("fanout"):
        time.sleep(0.05)
    assert "Traceback" not in node.processes.log("fanout")


def test_sigkilled_fanout_is_unsubscribed_at_the_publisher_and_a_restarted_one_streams_live_again(
    node: Node,
) -> None:
    async def stream_some(start: int) -> int:
        async with connect(node.url(), open_timeout=TIMEOUT, compression=None) as ws:
            got, nxt = await first_live(node, ws, start)
            node.append(nxt, nxt + 70)
            expected = since_live(got, start, nxt + 70)
            got += keys(await receive(ws, len(expected) - len(got)))
            assert got == expected
            return nxt + 70

    nxt = asyncio.run(asyncio.wait_for(stream_some(0), 60))
    node.processes.kill("fanout", signal.SIGKILL)
    # The XPUB reports the dead connection's topics as unsubscribed: nothing is sent for them.
    wait_until(
        lambda: node.processes.log("publisher").count("unsubscribed from b'dev") == 2,
        15,
        what="the publisher to see the killed fanout's topics go",
    )
    node.start("fanout")
    wait_for_port(node.port)
    asyncio.run(asyncio.wait_for(stream_some(nxt), 60))
    assert metric(node, "iotnode_fanout_gaps_total") == 0
    assert node.processes.log("publisher").count("subscribed to b'dev0\\x00'") == 2
