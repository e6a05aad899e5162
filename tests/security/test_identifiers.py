"""Finding 8 of issue 14: device ids.  ``*`` is reserved; control characters, bidi
overrides/isolates, zero-width and other format characters, whitespace and line
separators are refused (at token issue, at the handshake, in a client's
``devices`` claim and ``device=`` parameters); the limit stays 256 UTF-8 bytes."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Iterator

import jwt
import pytest
import websockets

from node.auth import MAX_DEVICE_ID_BYTES, check_device_id, issue_client_token, issue_device_token
from tests.security.conftest import SECRET, Server, running

REFUSED = [
    pytest.param("*", id="star"),
    pytest.param("a b", id="space"),
    pytest.param("a\tb", id="tab"),
    pytest.param("line\nbreak", id="newline"),
    pytest.param("x\x1b[31mred", id="escape"),
    pytest.param("x\x7f", id="del"),
    pytest.param("evil\u202etxt.exe", id="bidi-override"),
    pytest.param("a\u2066b\u2069", id="bidi-isolate"),
    pytest.param("zero\u200bwidth", id="zero-width-space"),
    pytest.param("\ufeffbom", id="bom"),
    pytest.param("a\u00a0b", id="nbsp"),
    pytest.param("a\u2028b", id="line-separator"),
    pytest.param("a\ue000b", id="private-use"),
    pytest.param("", id="empty"),
    pytest.param("a\0b", id="nul"),
    pytest.param("x" * (MAX_DEVICE_ID_BYTES + 1), id="too-long"),
]
ACCEPTED = ["sensor-1", "a*b", "capteur-é", "温度計-3", "dev.example:42/x", "x" * MAX_DEVICE_ID_BYTES]


@pytest.mark.parametrize("device_id", REFUSED)
def test_unusable_ids_are_refused_with_the_reason(device_id: str) -> None:
    with pytest.raises(ValueError, match="device id"):
        check_device_id(device_id)
    with pytest.raises(ValueError):
        issue_device_token(SECRET, device_id)
    if device_id != "*":
        with pytest.raises(ValueError):
            issue_client_token(SECRET, [device_id])


@pytest.mark.parametrize("device_id", ACCEPTED)
def test_printable_ids_are_accepted(device_id: str) -> None:
    assert check_device_id(device_id) == device_id


@pytest.fixture(scope="module")
def web() -> Iterator[Server]:
    with running("web") as server:
        yield server


@pytest.fixture(scope="module")
def fanout() -> Iterator[Server]:
    with running("fanout") as server:
        yield server


async def _status(url: str, token: str) -> int:
    try:
        async with websockets.connect(
            url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10
        ):
            return 101
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


@pytest.mark.parametrize("device_id", ["*", "evil\u202etxt", "a b", "x\x1by"])
def test_the_front_refuses_a_token_whose_sub_is_unusable_with_403(web: Server, device_id: str) -> None:
    token = jwt.encode({"sub": device_id, "exp": 2**31 - 1}, SECRET, algorithm="HS256")
    assert asyncio.run(_status(web.ws_url, token)) == 403


@pytest.mark.parametrize("device_id", ["evil\u202etxt", "a b", "x\x1by"])
def test_the_fanout_refuses_unusable_device_parameters_with_400(fanout: Server, device_id: str) -> None:
    token = issue_client_token(SECRET, ["*"], ttl=600)
    url = f"ws://127.0.0.1:{fanout.port}/v1/stream?device={urllib.parse.quote(device_id)}"
    assert asyncio.run(_status(url, token)) == 400
