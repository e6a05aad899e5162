"""The device front end to end: real uvicorn (2 workers), real ring, websockets client."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import time
import warnings

import jwt
import msgpack
import pytest
import websockets

from node.auth import issue_client_token
from tests.front.conftest import SECRET, Front
from tests.support import ring_envelopes

pytestmark = pytest.mark.timeout(120)


def run(coro):  # noqa: ANN001, ANN201 - tiny sync bridge for tests
    return asyncio.run(asyncio.wait_for(coro, 60))


def ring_records(front: Front) -> list:
    """Every record currently in the ingress ring, decoded (the test is the only consumer)."""
    return ring_envelopes(front.data_dir / "ingress.ring")


def test_msgpack_message_is_acked_in_msgpack_after_it_is_in_the_ring(front: Front) -> None:
    async def go() -> object:
        async with front.connect("mp-dev") as ws:
            await ws.send(msgpack.packb({"seq": 1, "ts": 1.5, "data": {"t": 20.5}}))
            reply = await ws.recv()
            assert isinstance(reply, bytes)
            return msgpack.unpackb(reply)

    assert run(go()) == {"ack": 1}
    stored = [r for r in ring_records(front) if r.device_id == "mp-dev"]
    assert [(r.seq, r.ts, r.data) for r in stored] == [(1, 1.5, {"t": 20.5})]
    assert abs(stored[0].received_at - time.time()) < 60


def test_json_message_is_acked_in_json(front: Front) -> None:
    async def go() -> object:
        async with front.connect("json-dev") as ws:
            await ws.send(json.dumps({"seq": 0, "data": [1, "two", None]}))
            reply = await ws.recv()
            assert isinstance(reply, str)
            return json.loads(reply)

    assert run(go()) == {"ack": 0}
    stored = [r for r in ring_records(front) if r.device_id == "json-dev"]
    assert [(r.seq, r.ts, r.data) for r in stored] == [(0, None, [1, "two", None])]


def test_token_in_query_parameter_is_accepted(front: Front) -> None:
    async def go() -> object:
        async with websockets.connect(f"{front.url}?token={front.token('query-dev')}", open_timeout=20) as ws:
            await ws.send(json.dumps({"seq": 5, "data": 1}))
            return json.loads(await ws.recv())

    assert run(go()) == {"ack": 5}


def test_acks_are_cumulative_increasing_and_cover_every_message(front: Front) -> None:
    count = 300

    async def go() -> list[int]:
        acks: list[int] = []
        async with front.connect("burst-dev") as ws:
            for seq in range(count):
                await ws.send(msgpack.packb({"seq": seq, "data": seq}))
            while not acks or acks[-1] < count - 1:
                acks.append(msgpack.unpackb(await asyncio.wait_for(ws.recv(), 20))["ack"])
        return acks

    acks = run(go())
    assert acks == sorted(set(acks)) and acks[-1] == count - 1 and len(acks) <= count
    stored = sorted(r.seq for r in ring_records(front) if r.device_id == "burst-dev")
    assert stored == list(range(count))


def test_mixed_encodings_ack_in_the_encoding_of_the_acked_message(front: Front) -> None:
    async def go() -> tuple[object, object]:
        async with front.connect("mixed-dev") as ws:
            await ws.send(msgpack.packb({"seq": 1, "data": 1}))
            first = await ws.recv()
            await ws.send(json.dumps({"seq": 2, "data": 2}))
            second = await ws.recv()
            return first, second

    first, second = run(go())
    assert msgpack.unpackb(first) == {"ack": 1} and json.loads(second) == {"ack": 2}


def test_error_frame_keeps_connection_open(front: Front) -> None:
    async def go() -> list[object]:
        replies: list[object] = []
        async with front.connect("err-dev") as ws:
            await ws.send('{"seq": -3, "data": 1}')
            replies.append(json.loads(await ws.recv()))
            await ws.send(msgpack.packb({"seq": 4}))
            replies.append(msgpack.unpackb(await ws.recv()))
            await ws.send(b"\xc1")
            replies.append(msgpack.unpackb(await ws.recv()))
            await ws.send(msgpack.packb({"seq": 6, "data": b"raw"}))
            replies.append(msgpack.unpackb(await ws.recv()))
            await ws.send(json.dumps({"seq": 7, "data": "ok"}))
            replies.append(json.loads(await ws.recv()))
        return replies

    assert run(go()) == [
        {"error": "seq must be a non-negative integer, got -3", "seq": None},
        {"error": "data is missing", "seq": 4},
        {"error": "undecodable MessagePack (1 bytes)", "seq": None},
        {"error": "data holds a MessagePack bin value (3 bytes); use a string or a list", "seq": 6},
        {"ack": 7},
    ]
    assert [r.seq for r in ring_records(front) if r.device_id == "err-dev"] == [7]


def test_oversize_frame_closes_with_1009(front: Front) -> None:
    async def go() -> int | None:
        async with front.connect("big-dev", max_size=None) as ws:
            await ws.send(b"\x00" * (65536 + 1))
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 20)
            return info.value.rcvd.code if info.value.rcvd else None

    assert run(go()) == 1009


def test_frame_of_exactly_max_size_is_accepted(front: Front) -> None:
    async def go() -> object:
        async with front.connect("edge-dev") as ws:
            frame = msgpack.packb({"seq": 1, "data": ""})
            pad = 65536 - len(frame) - 2  # a str16 header is 2 bytes longer than fixstr
            frame = msgpack.packb({"seq": 1, "data": "x" * pad})
            assert len(frame) == 65536
            await ws.send(frame)
            return msgpack.unpackb(await ws.recv())

    assert run(go()) == {"ack": 1}


def _refusal(front: Front, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(url, additional_headers=headers or {}, open_timeout=20):
                pass
        response = info.value.response
        return response.status_code, bytes(response.body or b"")

    return run(go())


def _raw_token(claims: dict, key: str = SECRET) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return jwt.encode(claims, key, algorithm="HS256")


def test_handshake_without_token_is_refused_401_without_upgrade(front: Front) -> None:
    status, body = _refusal(front, front.url)
    assert status == 401 and b"missing token" in body


def test_handshake_with_bad_signature_is_refused_401(front: Front) -> None:
    token = _raw_token({"sub": "x"}, key="some-other-secret-0123456789-0123456789")
    status, body = _refusal(front, front.url, {"Authorization": f"Bearer {token}"})
    assert status == 401 and b"signature" in body


def test_handshake_with_expired_token_is_refused_401(front: Front) -> None:
    token = _raw_token({"sub": "x", "exp": int(time.time()) - 10})
    status, body = _refusal(front, f"{front.url}?token={token}")
    assert status == 401 and body == b"token expired\n"


def test_handshake_with_client_token_is_refused_403(front: Front) -> None:
    token = issue_client_token(SECRET, ["*"])
    status, _ = _refusal(front, front.url, {"Authorization": f"Bearer {token}"})
    assert status == 403


def test_tokens_never_reach_the_log(front: Front) -> None:
    token = front.token("log-dev")

    async def go() -> None:
        async with websockets.connect(f"{front.url}?token={token}", open_timeout=20) as ws:
            await ws.send(json.dumps({"seq": 1, "data": 1}))
            await ws.recv()

    run(go())
    _refusal(front, f"{front.url}?token=garbage-token-value")
    log = front.log()
    assert "token=<redacted>" in log
    assert token not in log and "garbage-token-value" not in log and SECRET not in log


def test_resending_an_acked_seq_on_a_new_connection_is_acked_again(front: Front) -> None:
    async def go() -> list[object]:
        out = []
        for _ in range(2):
            async with front.connect("resend-dev") as ws:
                await ws.send(json.dumps({"seq": 10, "data": "same"}))
                out.append(json.loads(await ws.recv()))
        return out

    assert run(go()) == [{"ack": 10}, {"ack": 10}]


def test_oversize_frame_is_refused_from_its_header_before_the_payload(front: Front) -> None:
    """Only a frame header announcing 10 MiB is sent: the node answers 1009 at once."""

    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /v1/ingest HTTP/1.1\r\nHost: 127.0.0.1:{front.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {front.token('header-dev')}\r\n\r\n"
            ).encode()
        )
        status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert status.startswith(b"HTTP/1.1 101")
        # FIN + binary opcode, MASK bit + 127 (64-bit length), length, mask -- no payload.
        writer.write(bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 10 << 20) + os.urandom(4))
        await writer.drain()
        head = await asyncio.wait_for(reader.readexactly(2), 10)
        assert head[0] == 0x88  # FIN + close
        body = await asyncio.wait_for(reader.readexactly(head[1] & 0x7F), 10)
        writer.close()
        return struct.unpack("!H", body[:2])[0], body[2:]

    code, reason = run(go())
    assert code == 1009 and b"exceeds limit" in reason
