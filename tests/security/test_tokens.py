"""Finding 7 of issue 14: token lifetime and revocation.

* NODE_JWT_REQUIRE_EXP=on refuses tokens without exp; NODE_JWT_MAX_TTL refuses
  tokens that live longer (and tokens without exp);
* ``python -m node token`` prints tokens that expire in a year by default;
* a device session is closed with 1008 "token expired" when its token's exp
  passes (after its last ack), like the fanout's streams;
* NODE_JWT_DENYLIST revokes by subject (and not-before time), re-read on change,
  at the handshake and for open device sessions (closed with 1008 "token revoked");
* a configured NODE_JWT_SECRET needs 32 bytes; a group/other-readable jwt_secret
  file is refused.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import msgpack
import pytest
import websockets

from node.auth import (
    DEFAULT_CLI_TTL,
    Denylist,
    TokenPolicy,
    issue_client_token,
    issue_device_token,
    load_secret,
    verify_client_token,
    verify_device_token,
)
from node.config import Settings
from node.errors import AuthError, NodeError
from tests.security.conftest import SECRET, Server, running, short_dir
from tests.support import REPO, node_env, wait_until


def _claims(token: str) -> dict:
    return jwt.decode(token, SECRET, algorithms=["HS256"])


def _refusal(secret: str, token: str, policy: TokenPolicy) -> str:
    with pytest.raises(AuthError) as info:
        verify_device_token(secret, token, policy)
    assert info.value.status == 401
    return info.value.reason


# ------------------------------------------------------------------ the policy
def test_require_exp_refuses_a_token_without_exp_and_accepts_one_with() -> None:
    policy = TokenPolicy(require_exp=True)
    assert "no exp" in _refusal(SECRET, issue_device_token(SECRET, "d"), policy)
    assert verify_device_token(SECRET, issue_device_token(SECRET, "d", ttl=60), policy) == "d"
    with pytest.raises(AuthError):
        verify_client_token(SECRET, issue_client_token(SECRET, ["d"]), policy)


def test_max_ttl_refuses_longer_tokens_and_tokens_without_exp() -> None:
    policy = TokenPolicy(max_ttl=3600)
    assert "longer" in _refusal(SECRET, issue_device_token(SECRET, "d", ttl=7200), policy)
    assert "no exp" in _refusal(SECRET, issue_device_token(SECRET, "d"), policy)
    assert verify_device_token(SECRET, issue_device_token(SECRET, "d", ttl=3000), policy) == "d"


def test_the_default_policy_keeps_contract_3_exp_honoured_when_present() -> None:
    policy = TokenPolicy()
    assert verify_device_token(SECRET, issue_device_token(SECRET, "d"), policy) == "d"
    expired = jwt.encode({"sub": "d", "exp": int(time.time()) - 10}, SECRET, algorithm="HS256")
    assert _refusal(SECRET, expired, policy) == "token expired"


def test_denylist_revokes_by_subject_and_not_before_and_is_reread(tmp_path: Path) -> None:
    path = tmp_path / "denylist"
    cutoff = int(time.time()) - 100
    path.write_text(f"# revoked devices\nlost-1\nrotated {cutoff}  # tokens issued before\n")
    Denylist.CHECK_EVERY = 0.0  # re-read at every check (the node: once a second)
    try:
        policy = TokenPolicy(denylist=Denylist(path))
        assert _refusal(SECRET, issue_device_token(SECRET, "lost-1", ttl=60), policy) == "token revoked"
        old = jwt.encode({"sub": "rotated", "iat": cutoff - 100}, SECRET, algorithm="HS256")
        assert _refusal(SECRET, old, policy) == "token revoked"
        assert _refusal(SECRET, issue_device_token(SECRET, "rotated"), policy) == "token revoked"  # no iat
        assert verify_device_token(SECRET, issue_device_token(SECRET, "rotated", ttl=60), policy) == "rotated"
        assert verify_device_token(SECRET, issue_device_token(SECRET, "ok", ttl=60), policy) == "ok"
        path.write_text("ok\n")  # changed: lost-1 is allowed again, ok is revoked
        assert verify_device_token(SECRET, issue_device_token(SECRET, "lost-1", ttl=60), policy) == "lost-1"
        assert _refusal(SECRET, issue_device_token(SECRET, "ok", ttl=60), policy) == "token revoked"
        path.write_text("a b c\n")  # malformed: the previous version stays in force
        assert _refusal(SECRET, issue_device_token(SECRET, "ok", ttl=60), policy) == "token revoked"
    finally:
        Denylist.CHECK_EVERY = 1.0


def test_a_malformed_denylist_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "denylist"
    path.write_text("dev not-a-time\n")
    with pytest.raises(NodeError, match="not a unix time"):
        Denylist(path)


# ------------------------------------------------------------------ CLI defaults
def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", "token", *args],
        env=env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_tokens_expire_in_a_year_by_default_and_no_expiry_is_explicit(tmp_path: Path) -> None:
    env = node_env(tmp_path, NODE_JWT_SECRET=SECRET)
    claims = _claims(_cli(env, "dev").stdout.strip())
    assert abs(claims["exp"] - time.time() - DEFAULT_CLI_TTL) < 60
    claims = _claims(_cli(env, "--client", "--devices", "a").stdout.strip())
    assert abs(claims["exp"] - time.time() - DEFAULT_CLI_TTL) < 60
    assert "exp" not in _claims(_cli(env, "dev", "--no-expiry").stdout.strip())
    short = _claims(_cli({**env, "NODE_JWT_MAX_TTL": "600"}, "dev").stdout.strip())
    assert abs(short["exp"] - time.time() - 600) < 60
    out = _cli(env, "dev", "--ttl", "5", "--no-expiry")
    assert out.returncode == 2 and "exclude" in out.stderr


# ------------------------------------------------------------------ a real node
@pytest.fixture(scope="module")
def denylist_path() -> Iterator[Path]:
    directory = short_dir("sec-deny-")
    path = directory / "denylist"
    path.write_text("# nothing revoked yet\n")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        directory.rmdir()


@pytest.fixture(scope="module")
def web(denylist_path: Path) -> Iterator[Server]:
    with running("web", NODE_JWT_MAX_TTL="3600", NODE_JWT_DENYLIST=str(denylist_path)) as server:
        yield server


async def _status(web: Server, token: str) -> int:
    try:
        async with websockets.connect(
            web.ws_url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10
        ):
            return 101
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


def test_the_node_applies_max_ttl(web: Server) -> None:
    assert asyncio.run(_status(web, issue_device_token(SECRET, "t1", ttl=7200))) == 401
    assert asyncio.run(_status(web, issue_device_token(SECRET, "t1"))) == 401
    assert asyncio.run(_status(web, issue_device_token(SECRET, "t1", ttl=600))) == 101


def test_a_device_session_is_closed_with_1008_when_its_token_expires(web: Server) -> None:
    async def go() -> tuple[int | None, str, float]:
        token = issue_device_token(SECRET, "short-lived", ttl=2)
        exp = _claims(token)["exp"]
        async with websockets.connect(
            web.ws_url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10
        ) as ws:
            await ws.send(msgpack.packb({"seq": 1, "data": 1}))
            assert msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10)) == {"ack": 1}
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None
                return closed.rcvd.code, closed.rcvd.reason, time.time() - exp

    code, reason, late = asyncio.run(go())
    assert (code, reason) == (1008, "token expired")
    assert -1.0 <= late <= 3.0


def test_the_denylist_revokes_a_device_without_a_restart(web: Server, denylist_path: Path) -> None:
    token = issue_device_token(SECRET, "stolen", ttl=600)
    assert asyncio.run(_status(web, token)) == 101
    denylist_path.write_text("stolen\n")
    wait_until(lambda: asyncio.run(_status(web, token)) == 401, 10, interval=0.3, what="the revocation")
    assert asyncio.run(_status(web, issue_device_token(SECRET, "other", ttl=600))) == 101


def test_an_open_session_is_closed_with_1008_when_its_device_is_revoked(
    web: Server, denylist_path: Path
) -> None:
    async def go() -> tuple[int | None, str]:
        token = issue_device_token(SECRET, "revoked-live", ttl=600)
        async with websockets.connect(
            web.ws_url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10
        ) as ws:
            await ws.send(msgpack.packb({"seq": 1, "data": 1}))
            assert msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10)) == {"ack": 1}
            denylist_path.write_text(denylist_path.read_text() + "revoked-live\n")
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None
                return closed.rcvd.code, closed.rcvd.reason

    assert asyncio.run(go()) == (1008, "token revoked")


# ------------------------------------------------------------------ secrets
def test_a_secret_under_32_bytes_is_refused_by_the_web_process(tmp_path: Path) -> None:
    env = node_env(tmp_path, NODE_JWT_SECRET="x" * 31)
    out = subprocess.run(
        [sys.executable, "-m", "node.workers.web"],
        env=env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "NODE_JWT_SECRET" in out.stderr and "x" * 31 not in out.stderr


def test_a_jwt_secret_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    secret = load_secret(settings)  # generated 0600
    assert len(secret) >= 32
    os.chmod(settings.jwt_secret_path, 0o644)
    with pytest.raises(NodeError, match="chmod 600"):
        load_secret(settings)
    env = node_env(tmp_path)
    env.pop("NODE_JWT_SECRET")
    out = subprocess.run(
        [sys.executable, "-m", "node.workers.web"],
        env=env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "chmod 600" in out.stderr
