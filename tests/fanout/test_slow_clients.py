"""A client that does not read is closed with 1013; nobody else notices."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.fanout.conftest import TIMEOUT, FanoutNode, keys, receive, unique
from tests.support import Processes

QUEUE = 32
PAYLOAD = "x" * 8192
BURST = 50
MAX_BURSTS = 200  # 80 MB at most; the kernel buffers of one stalled socket fill far sooner


@pytest.fixture
def small_queue_fanout(private_dir: Path) -> Iterator[FanoutNode]:
    processes = Processes()
    node = FanoutNode(processes, private_dir, NODE_FANOUT_QUEUE=QUEUE, NODE_WS_PING_INTERVAL=120)
    try:
        yield node
    finally:
        node.close()
        processes.stop_all()


def stalled_socket(port: int) -> socket.socket:
    """A connected TCP socket with a tiny receive buffer: it fills after a few frames."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def test_slow_client_is_closed_with_1013_while_another_keeps_receiving(
    small_queue_fanout: FanoutNode,
) -> None:
    node = small_queue_fanout
    device = unique("slow")

    async def scenario() -> None:
        fast = await node.connect([device]).__aenter__()
        # The slow client never reads: max_queue=1 stops websockets reading the socket
        # after one frame, and the tiny receive buffer stops TCP soon after.
        slow = await connect(
            node.stream_url([device], node.token([device])),
            sock=stalled_socket(node.port),
            max_queue=1,
            compression=None,
            ping_interval=None,
            open_timeout=TIMEOUT,
        ).__aenter__()
        try:
            node.publisher.wait_subscribed(device)
            seq = 0
            fast_seen: list[tuple[str, int]] = []
            for _ in range(MAX_BURSTS):
                for _ in range(BURST):
                    seq += 1
                    node.publisher.publish(device, seq, PAYLOAD)
                fast_seen += keys(await receive(fast, BURST))
                if node.metric("iotnode_fanout_slow_client_drops_total") >= 1:
                    break
            else:
                raise AssertionError(f"the stalled client was never closed after {seq} messages")
            # The fast client is unaffected and keeps streaming after the slow one is gone.
            for _ in range(BURST):
                seq += 1
                node.publisher.publish(device, seq, "after")
            fast_seen += keys(await receive(fast, BURST))
            assert fast_seen == [(device, s) for s in range(1, seq + 1)]

            # The slow client, reading at last, finds an in-order prefix, then close code 1013.
            slow_seqs: list[int] = []
            deadline = time.monotonic() + 60
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(seq + 1):
                    assert time.monotonic() < deadline, "slow client not closed within 60s"
                    frame = await asyncio.wait_for(slow.recv(), TIMEOUT)
                    slow_seqs.append(int(frame.split('"seq":', 1)[1].split(",", 1)[0]))
            assert closed.value.rcvd is not None, f"closed without a close frame: {closed.value!r}"
            assert closed.value.rcvd.code == 1013
            assert "too slow" in closed.value.rcvd.reason
            assert slow_seqs == list(range(1, len(slow_seqs) + 1))
            assert len(slow_seqs) < seq
        finally:
            await fast.close()
            await slow.close()
        assert node.metric("iotnode_fanout_slow_client_drops_total") == 1

    asyncio.run(asyncio.wait_for(scenario(), 120))
