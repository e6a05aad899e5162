"""A full ingress ring, end to end: acks stop, then the socket stops accepting;
when the consumer frees space everything is acked and nothing was dropped."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from pathlib import Path

import msgpack
import pytest

from node.record import unpack_record
from node.ring import Ring
from tests.front.conftest import Front, start_front
from tests.support import Processes

pytestmark = pytest.mark.timeout(120)


def test_full_ring_stops_acks_then_reading_and_resumes_without_loss(
    data_dir: Path, tmp_path: Path, processes: Processes
) -> None:
    front = start_front(
        data_dir,
        tmp_path,
        processes,
        NODE_INGRESS_RING_BYTES=1 << 20,
        NODE_CONN_WINDOW=16,
        NODE_WEB_WORKERS=1,
    )
    total, pad = 2000, "p" * 8000  # ~16 MiB: far more than the ring and the kernel's socket buffers
    acked = [-1]

    async def go() -> tuple[int, bool, list[int]]:
        async with front.connect("bp-dev", ping_interval=None, max_queue=None) as ws:

            async def sender() -> None:
                for seq in range(total):
                    await ws.send(msgpack.packb({"seq": seq, "data": pad}))

            async def reader() -> None:
                async for frame in ws:
                    acked[0] = msgpack.unpackb(frame)["ack"]
                    if acked[0] == total - 1:
                        return

            send_task = asyncio.create_task(sender())
            read_task = asyncio.create_task(reader())
            # Wait until acks stop moving (the ring is full; nobody consumes it).
            last, still = -2, 0
            for _ in range(300):
                await asyncio.sleep(0.05)
                still = still + 1 if acked[0] == last else 0
                last = acked[0]
                if still >= 10 and last >= 0:
                    break
            stalled_at = acked[0]
            sender_blocked = not send_task.done()
            # Be the ring's consumer: pop what is there, repeatedly, until all is acked.
            ring = Ring.open(front.data_dir / "ingress.ring", capacity=1 << 20)
            seqs: list[int] = []
            try:
                reader_ = ring.reader()
                pos = ring.head
                for _ in range(3000):
                    batch = await asyncio.get_running_loop().run_in_executor(None, reader_.read, pos, 4096)
                    for record in batch:
                        seqs.append(unpack_record(record.payload).seq)
                    if batch:
                        pos = batch[-1].end
                        reader_.pop(pos)
                    elif read_task.done() and send_task.done():
                        break
                    else:
                        await asyncio.sleep(0.01)
                reader_.close()
            finally:
                ring.close()
            await asyncio.wait_for(asyncio.gather(send_task, read_task), 30)
            return stalled_at, sender_blocked, seqs

    stalled_at, sender_blocked, seqs = asyncio.run(asyncio.wait_for(go(), 100))
    assert 0 <= stalled_at < total - 1, "acks should stall while the ring is full"
    assert sender_blocked, "the socket should stop accepting while the ring is full"
    assert acked[0] == total - 1
    assert seqs == list(range(total)), "every message reached the ring once, in order"


async def _upgrade(front: Front, device: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw WebSocket upgrade as ``device`` (frames are then read and written by hand)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /v1/ingest HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {front.token(device)}\r\n\r\n"
        ).encode()
    )
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return reader, writer


def test_keepalive_ping_closes_a_silent_device(data_dir: Path, tmp_path: Path, processes: Processes) -> None:
    """NODE_WS_PING_INTERVAL/_TIMEOUT reach uvicorn: a peer that never answers pings
    gets pinged, then closed (1011, keepalive ping timeout)."""
    front = start_front(
        data_dir, tmp_path, processes, NODE_WS_PING_INTERVAL="0.3", NODE_WS_PING_TIMEOUT="0.3"
    )

    async def go() -> tuple[list[int], int | None, float]:
        reader, writer = await _upgrade(front, "silent")
        start = end = asyncio.get_running_loop().time()
        opcodes: list[int] = []
        close_code = None
        for _ in range(20):  # read frames (never answering) until the close frame
            head = await asyncio.wait_for(reader.readexactly(2), 10)
            length = head[1] & 0x7F
            body = await reader.readexactly(length)
            opcodes.append(head[0] & 0x0F)
            if head[0] & 0x0F == 0x8:
                close_code = struct.unpack("!H", body[:2])[0]
                end = asyncio.get_running_loop().time()
                break
        writer.close()
        return opcodes, close_code, end - start

    opcodes, close_code, elapsed = asyncio.run(asyncio.wait_for(go(), 30))
    assert opcodes[0] == 0x9 and opcodes[-1] == 0x8, opcodes  # ping first, close last
    assert close_code == 1011 and elapsed < 5


def _masked(payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x82, 0x80 | len(payload)]) + mask + body


def test_keepalive_pings_only_a_connection_that_went_silent(
    data_dir: Path, tmp_path: Path, processes: Processes
) -> None:
    """A device that sends is not pinged (its frames prove it is there: 10k devices at
    1 msg/s would otherwise pay for 500 pings and pongs a second); once it goes silent
    it is pinged within two intervals and closed (1011) without its pong, as before."""
    front = start_front(
        data_dir, tmp_path, processes, NODE_WS_PING_INTERVAL="0.3", NODE_WS_PING_TIMEOUT="0.3"
    )

    async def go() -> tuple[list[tuple[float, int]], float, int | None, int]:
        reader, writer = await _upgrade(front, "chatty")
        loop = asyncio.get_running_loop()
        frames: list[tuple[float, int]] = []
        close_code: list[int] = []
        acks = [0]

        async def read() -> None:
            while True:
                head = await reader.readexactly(2)
                body = await reader.readexactly(head[1] & 0x7F)
                frames.append((loop.time(), head[0] & 0x0F))
                if head[0] & 0x0F == 0x2:
                    acks[0] += 1
                if head[0] & 0x0F == 0x8:
                    close_code.append(struct.unpack("!H", body[:2])[0])
                    return

        reading = asyncio.create_task(read())
        sent = 0
        for seq in range(20):  # 2 s of a frame every 0.1 s: six ping intervals
            writer.write(_masked(msgpack.packb({"seq": seq, "data": {"t": seq}})))
            sent += 1
            await asyncio.sleep(0.1)
        silent_at = loop.time()
        await asyncio.wait_for(reading, 10)  # never answers the ping: closed
        writer.close()
        assert acks[0] == sent, (acks[0], sent)
        return frames, silent_at, close_code[0] if close_code else None, sent

    frames, silent_at, close_code, _sent = asyncio.run(asyncio.wait_for(go(), 30))
    pings = [t for t, op in frames if op == 0x9]
    assert pings, frames
    assert all(t >= silent_at for t in pings), f"pinged while sending: {pings} < {silent_at}"
    assert pings[0] - silent_at < 0.3 * 2 + 0.3, (pings[0], silent_at)
    assert close_code == 1011
