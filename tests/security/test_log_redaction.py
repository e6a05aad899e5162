"""Finding 6 of issue 14: no credential reaches a log, whatever logger writes it and at
every level: JWT-shaped strings, Authorization header values (also a bad, not
JWT-shaped one), ``?token=`` in any spelling (``?%74oken=`` authenticates too).
Checked through a handler with the filter (every level) and in the logs of real
web and fanout processes run at NODE_LOG_LEVEL=debug."""

from __future__ import annotations

import asyncio
import io
import logging
import urllib.parse
from collections.abc import Iterator

import pytest
import websockets

from node.auth import issue_client_token, issue_device_token
from node.logredact import RedactSecrets, install, redact
from tests.security.conftest import SECRET, Server, running

TOKEN = issue_device_token(SECRET, "logged-device", ttl=600)
NOT_A_JWT = "hunter2-not-a-jwt-but-a-credential"
ENCODED = "".join(f"%{b:02X}" for b in TOKEN.encode())  # every character percent-encoded


@pytest.mark.parametrize(
    "text",
    [
        f"GET /v1/ingest?token={TOKEN} HTTP/1.1",
        f"GET /v1/ingest?%74oken={TOKEN}",
        f"/v1/ingest?device=a&%74%6F%6B%65%6E={NOT_A_JWT}",
        f"/v1/ingest?x=1&token={ENCODED}",
        f"/v1/ingest?sig={ENCODED}",
        f"< Authorization: Bearer {NOT_A_JWT}",
        f"headers [(b'authorization', b'Bearer {NOT_A_JWT}')]",
        f"decoded {TOKEN} in the middle of a sentence",
    ],
)
def test_redact_removes_every_spelling_of_a_credential(text: str) -> None:
    cleaned = redact(text)
    for secret in (TOKEN, NOT_A_JWT, ENCODED, TOKEN.split(".")[2]):
        assert secret not in cleaned, cleaned


def test_ordinary_lines_are_left_alone() -> None:
    line = "ingress ring /tmp/x/ingress.ring (backend msync, threaded commit), window 256, 50% full"
    assert redact(line) == line


@pytest.mark.parametrize(
    "level", [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL]
)
def test_a_handler_with_the_filter_never_writes_a_token_at_any_level(level: int) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger(f"tests.security.redaction.{level}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        install()  # what the servers do at start: every configured handler gets the filter
        assert any(isinstance(f, RedactSecrets) for f in handler.filters)
        logger.log(
            level, "request %s with %s", f"/v1/ingest?%74oken={TOKEN}", f"Authorization: Bearer {NOT_A_JWT}"
        )
        try:
            raise ValueError(f"bad token {TOKEN}")
        except ValueError:
            logger.log(level, "failed", exc_info=True)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "request" in text and "failed" in text and "ValueError" in text
    assert TOKEN not in text and NOT_A_JWT not in text and TOKEN.split(".")[1] not in text


# ------------------------------------------------------------------ real processes
@pytest.fixture(scope="module", params=["web", "fanout"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    with running(request.param, NODE_LOG_LEVEL="debug") as s:
        yield s


def _attempts(server: Server) -> tuple[list[tuple[str, dict[str, str]]], str]:
    if server.kind == "web":
        token = TOKEN
    else:
        token = issue_client_token(SECRET, ["d1"], ttl=600)
    base = f"ws://127.0.0.1:{server.port}{server.path}"
    sep = "&" if "?" in base else "?"
    return [
        (base, {"Authorization": f"Bearer {token}"}),
        (f"{base}{sep}token={token}", {}),
        (f"{base}{sep}%74oken={token}", {}),
        (f"{base}{sep}token={''.join(f'%{b:02X}' for b in token.encode())}", {}),
        (base, {"Authorization": f"Bearer {NOT_A_JWT}"}),
        (f"{base}{sep}%74oken={urllib.parse.quote(NOT_A_JWT)}", {}),
    ], token


def test_no_token_spelling_reaches_the_process_log_at_debug_level(server: Server) -> None:
    attempts, token = _attempts(server)

    async def go() -> None:
        for url, headers in attempts:
            try:
                async with websockets.connect(url, additional_headers=headers, open_timeout=10) as ws:
                    if server.kind == "web":
                        await ws.send('{"seq": 1, "data": 1}')
                    await asyncio.sleep(0.05)
            except websockets.InvalidStatus:
                pass  # the bad credentials are refused; their log lines are checked all the same

    asyncio.run(go())
    log = server.log()
    assert "DEBUG" in log  # debug logging was on
    for secret in (token, token.split(".")[1], token.split(".")[2], NOT_A_JWT):
        assert secret not in log, f"{secret[:20]}... is in the {server.kind} log"
