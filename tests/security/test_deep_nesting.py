"""Finding 5 of issue 14: a deeply nested ``seq``/``ts`` (a ~1 KB frame) gets the
contract's error reply ``{"error": ..., "seq": null}`` and the connection stays open
(it used to raise RecursionError while formatting the reason: the worker dropped the
TCP connection without a close frame and logged a traceback).  The client library's
``decode_reply`` answers ProtocolError for the same shapes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import websockets

from node.protocol import ErrorReply, ProtocolError, decode_reply, parse_frame
from tests.security.conftest import Server, running

DEPTH = 1010  # below msgpack's stack limit (1024), above repr's recursion limit (1000)
JSON_DEEP = "[" * 990 + "0" + "]" * 990  # json's decoder itself stops near 1000 levels


def _deep(depth: int = DEPTH) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


FRAMES = [
    pytest.param(msgpack.packb({"seq": _deep(), "data": 1}), None, id="msgpack-seq"),
    pytest.param('{"seq": ' + JSON_DEEP + ', "data": 1}', None, id="json-seq"),
    pytest.param(msgpack.packb({"seq": 7, "data": 1, "ts": _deep()}), 7, id="msgpack-ts"),
    # json's decoder refuses this deep a ts itself (undecodable: seq unknown)
    pytest.param('{"seq": 7, "data": 1, "ts": ' + JSON_DEEP + "}", None, id="json-ts"),
    pytest.param(msgpack.packb({"seq": {"a": _deep()}, "data": 1}), None, id="msgpack-seq-map"),
]


@pytest.mark.parametrize(("frame", "seq"), FRAMES)
def test_parse_frame_answers_an_error_reply_for_deep_nesting(frame: bytes | str, seq: int | None) -> None:
    assert len(frame) < 4096  # about 1 KB
    result = parse_frame(frame)
    assert isinstance(result, ErrorReply)
    assert result.seq == seq and len(result.reason) < 200


@pytest.mark.parametrize(
    "reply",
    [
        msgpack.packb({"ack": _deep()}),
        '{"ack": ' + JSON_DEEP + "}",
        msgpack.packb({"error": _deep(), "seq": None}),
        '{"error": "x", "seq": ' + JSON_DEEP + "}",
        msgpack.packb(_deep()),
        JSON_DEEP,
    ],
)
def test_decode_reply_raises_protocol_error_for_deep_nesting(reply: bytes | str) -> None:
    with pytest.raises(ProtocolError):
        decode_reply(reply)


@pytest.fixture(scope="module")
def web() -> Iterator[Server]:
    with running("web") as server:
        yield server


@pytest.mark.parametrize(("frame", "seq"), FRAMES)
def test_the_node_answers_deep_nesting_with_an_error_and_keeps_the_connection(
    web: Server, frame: bytes | str, seq: int | None
) -> None:
    async def go() -> None:
        headers = {"Authorization": f"Bearer {web.token('deep')}"}
        async with websockets.connect(web.ws_url, additional_headers=headers, open_timeout=10) as ws:
            await ws.send(frame)
            reply = await asyncio.wait_for(ws.recv(), 10)
            decoded = msgpack.unpackb(reply) if isinstance(reply, bytes) else json.loads(reply)
            assert set(decoded) == {"error", "seq"} and decoded["seq"] == seq
            await ws.send(msgpack.packb({"seq": 1, "data": "still open"}))
            ack = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10))
            assert ack == {"ack": 1}

    asyncio.run(go())
    assert "Traceback" not in web.log() and "RecursionError" not in web.log()
