"""Finding 10 of issue 14: a client app's queue is bounded in bytes too
(NODE_FANOUT_QUEUE_BYTES), not only in messages: a stalled client following a
device that sends large records is closed with 1013 once its queued JSON passes the
byte limit, long before the message limit."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from node.fanout.hub import Client, Selection
from tests.fanout.conftest import TIMEOUT, FanoutNode, short_data_dir, unique
from tests.fanout.test_slow_clients import stalled_socket
from tests.support import Processes

QUEUE_BYTES = 65536
PAYLOAD = "x" * 8192  # the message limit (1024 x 8 KiB) alone would allow 8 MiB per client


def test_the_queue_overflows_on_bytes_before_messages() -> None:
    client = Client(Selection(False, frozenset({"a"})), limit=1024, max_bytes=QUEUE_BYTES)
    offered = 0
    while client.offer(PAYLOAD):
        offered += 1
        assert offered < 1024
    assert offered == QUEUE_BYTES // len(PAYLOAD)
    assert client.overflow_reason == f"too slow: more than {QUEUE_BYTES} bytes queued"
    assert client.queued_bytes == 0 and not client.queue


def test_take_gives_the_bytes_back() -> None:
    client = Client(Selection(False, frozenset({"a"})), limit=1024, max_bytes=3 * len(PAYLOAD))
    for _ in range(3):
        assert client.offer(PAYLOAD)
    assert client.take() == PAYLOAD and client.queued_bytes == 2 * len(PAYLOAD)
    assert client.offer(PAYLOAD)  # room again


@pytest.fixture
def fanout() -> Iterator[FanoutNode]:
    processes = Processes()
    private_dir = short_data_dir()
    node = FanoutNode(processes, private_dir, NODE_FANOUT_QUEUE_BYTES=QUEUE_BYTES, NODE_WS_PING_INTERVAL=120)
    try:
        yield node
    finally:
        node.close()
        processes.stop_all()
        shutil.rmtree(private_dir, ignore_errors=True)


def test_a_stalled_client_is_closed_with_1013_naming_the_byte_limit(fanout: FanoutNode) -> None:
    device = unique("bytes")

    async def scenario() -> None:
        slow = await connect(
            fanout.stream_url([device], fanout.token([device])),
            sock=stalled_socket(fanout.port),
            max_queue=1,
            compression=None,
            ping_interval=None,
            open_timeout=TIMEOUT,
        ).__aenter__()
        try:
            fanout.publisher.wait_subscribed(device)
            seq = 0
            deadline = time.monotonic() + 60
            while fanout.metric("iotnode_fanout_slow_client_drops_total") < 1:
                assert time.monotonic() < deadline and seq < 20_000, f"not closed after {seq} messages"
                for _ in range(50):
                    seq += 1
                    fanout.publisher.publish(device, seq, PAYLOAD)
                await asyncio.sleep(0.05)
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(seq + 1):
                    await asyncio.wait_for(slow.recv(), TIMEOUT)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1013
            assert closed.value.rcvd.reason == f"too slow: more than {QUEUE_BYTES} bytes queued"
        finally:
            await slow.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))
