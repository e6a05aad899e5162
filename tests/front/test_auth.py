"""Tokens and the shared secret: real PyJWT, real files, real processes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jwt
import pytest

from node.auth import (
    MAX_DEVICE_ID_BYTES,
    check_device_id,
    client_allows,
    issue_client_token,
    issue_device_token,
    load_secret,
    token_from_request,
    verify_client_token,
    verify_device_token,
)
from node.config import Settings
from node.errors import AuthError
from tests.support import REPO, node_env, run_module

SECRET = "test-secret-0123456789abcdef-0123456789"  # the one tests.support.node_env sets


def raw_token(claims: dict, key: str | None = SECRET, algorithm: str = "HS256") -> str:
    """A token built with PyJWT directly (the test secret is below PyJWT's 32-byte advice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return jwt.encode(claims, key, algorithm=algorithm)


def raw_claims(token: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return jwt.decode(token, SECRET, algorithms=["HS256"])


def run_token_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_module("node", "token", *args, env=env)


def test_token_cli_prints_a_device_token_that_verifies(data_dir: Path) -> None:
    out = run_token_cli(node_env(data_dir), "sensor-1")
    assert out.returncode == 0, out.stderr
    assert verify_device_token(SECRET, out.stdout.strip()) == "sensor-1"


def test_token_cli_ttl_sets_exp(data_dir: Path) -> None:
    out = run_token_cli(node_env(data_dir), "sensor-1", "--ttl", "60")
    claims = raw_claims(out.stdout.strip())
    assert 55 <= claims["exp"] - time.time() <= 61


def test_token_cli_prints_a_client_token_with_devices(data_dir: Path) -> None:
    out = run_token_cli(node_env(data_dir), "--client", "--devices", "a,b")
    assert out.returncode == 0, out.stderr
    assert verify_client_token(SECRET, out.stdout.strip()) == frozenset({"a", "b"})


@pytest.mark.parametrize(
    "args,message",
    [
        ((), "DEVICE_ID is required"),
        (("--client",), "--client needs --devices"),
        (("dev", "--client", "--devices", "a"), "--client takes no DEVICE_ID"),
        (("dev", "--ttl", "-5"), "--ttl must be > 0"),
        (("dev", "--ttl", "soon"), "invalid float value: 'soon'"),
        (("x" * 300,), "device id is 300 UTF-8 bytes"),
    ],
)
def test_token_cli_usage_errors_exit_2_with_a_message(
    data_dir: Path, args: tuple[str, ...], message: str
) -> None:
    out = run_token_cli(node_env(data_dir), *args)
    assert out.returncode == 2 and message in out.stderr and out.stdout == ""


def test_token_cli_bad_configuration_names_the_variable(data_dir: Path) -> None:
    out = run_token_cli(node_env(data_dir, NODE_JWT_SECRET="short"), "dev")
    assert out.returncode == 2 and "NODE_JWT_SECRET" in out.stderr and "short" not in out.stderr


def test_device_token_round_trip_and_optional_exp() -> None:
    assert verify_device_token(SECRET, issue_device_token(SECRET, "d")) == "d"
    assert verify_device_token(SECRET, issue_device_token(SECRET, "d", ttl=30)) == "d"


def test_expired_token_is_refused_with_401() -> None:
    token = raw_token({"sub": "d", "exp": int(time.time()) - 5})
    with pytest.raises(AuthError) as info:
        verify_device_token(SECRET, token)
    assert (info.value.status, info.value.reason) == (401, "token expired")


@pytest.mark.parametrize(
    "token,reason",
    [
        (None, "missing token"),
        ("", "missing token"),
        ("not-a-jwt", "malformed token"),
        (issue_device_token("another-secret-0123456789-0123456789", "d"), "token signature does not verify"),
        (raw_token({"sub": "d"}, None, "none"), "token algorithm is not HS256"),
        (raw_token({"x": 1}), "token lacks the 'sub' claim"),
    ],
)
def test_invalid_device_tokens_are_refused_with_401(token: str | None, reason: str) -> None:
    with pytest.raises(AuthError) as info:
        verify_device_token(SECRET, token)
    assert info.value.status == 401 and info.value.reason.startswith(reason)
    if token:
        assert token not in str(info.value)


def test_client_token_cannot_ingest_403() -> None:
    with pytest.raises(AuthError) as info:
        verify_device_token(SECRET, issue_client_token(SECRET, ["*"]))
    assert info.value.status == 403


@pytest.mark.parametrize("sub", ["", "a\0b", "x" * (MAX_DEVICE_ID_BYTES + 1), "é" * 129])
def test_unusable_device_id_in_a_genuine_token_is_refused_with_403(sub: str) -> None:
    token = raw_token({"sub": sub})
    with pytest.raises(AuthError) as info:
        verify_device_token(SECRET, token)
    assert info.value.status == 403 and info.value.reason.startswith("unusable sub claim: device id")


def test_non_string_sub_is_refused_with_401() -> None:
    with pytest.raises(AuthError) as info:
        verify_device_token(SECRET, raw_token({"sub": 5}))
    assert info.value.status == 401


def test_device_id_limits() -> None:
    assert check_device_id("x" * MAX_DEVICE_ID_BYTES) == "x" * MAX_DEVICE_ID_BYTES
    with pytest.raises(ValueError, match="257 UTF-8 bytes"):
        check_device_id("x" * 257)
    with pytest.raises(ValueError, match="NUL"):
        check_device_id("a\0")
    with pytest.raises(ValueError, match="got int"):
        check_device_id(5)


def test_client_token_grants_and_wildcard() -> None:
    allowed = verify_client_token(SECRET, issue_client_token(SECRET, ["a", "b"]))
    assert client_allows(allowed, "a") and not client_allows(allowed, "c")
    everything = verify_client_token(SECRET, issue_client_token(SECRET, ["*"]))
    assert client_allows(everything, "anything")


@pytest.mark.parametrize(
    "claims",
    [{"sub": "dev"}, {"devices": []}, {"devices": "a"}, {"devices": [1]}, {"devices": ["a\0"]}],
)
def test_client_token_without_a_usable_devices_claim_is_refused_with_403(claims: dict) -> None:
    with pytest.raises(AuthError) as info:
        verify_client_token(SECRET, raw_token(claims))
    assert info.value.status == 403


def test_expired_client_token_is_refused_with_401() -> None:
    token = raw_token({"devices": ["*"], "exp": int(time.time()) - 1})
    with pytest.raises(AuthError) as info:
        verify_client_token(SECRET, token)
    assert info.value.status == 401


def test_token_from_request_prefers_bearer_header() -> None:
    assert token_from_request({"authorization": "Bearer abc"}, {"token": "q"}) == "abc"
    assert token_from_request({"authorization": "bearer  abc "}, {}) == "abc"
    assert token_from_request({}, {"token": "q"}) == "q"
    assert token_from_request({}, {}) is None
    assert token_from_request({"authorization": "Basic xyz"}, {"token": "q"}) is None


# ------------------------------------------------------------------ the secret
def test_env_secret_wins_and_no_file_is_written(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, jwt_secret=SECRET)
    assert load_secret(settings) == SECRET
    assert not (data_dir / "jwt_secret").exists()


def test_generated_secret_file_is_0600_and_stable(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "new-dir")
    first = load_secret(settings)
    mode = stat.S_IMODE(os.stat(settings.jwt_secret_path).st_mode)
    assert mode == 0o600
    assert len(first) >= 40 and load_secret(settings) == first
    assert [p.name for p in settings.data_path.iterdir()] == ["jwt_secret"]  # no temp file left


def test_truncated_secret_file_is_an_error_not_a_weak_key(data_dir: Path) -> None:
    (data_dir / "jwt_secret").write_text("abc")
    os.chmod(data_dir / "jwt_secret", 0o600)
    with pytest.raises(Exception, match="delete it to regenerate"):
        load_secret(Settings(data_dir=data_dir))


def test_concurrent_first_starts_agree_on_one_secret(data_dir: Path) -> None:
    """Many processes generate the secret at the same instant; all print the same one."""
    env = node_env(data_dir)
    del env["NODE_JWT_SECRET"]
    script = (
        "import time, sys\n"
        "from node.config import load_settings\n"
        "from node.auth import load_secret\n"
        "s = load_settings()\n"
        "t = float(sys.argv[1])\n"
        "while time.time() < t: pass\n"
        "print(load_secret(s))\n"
    )
    start_at = f"{time.time() + 1.5:.3f}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, start_at],
            env=env,
            cwd=str(REPO),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    outputs = [p.communicate(timeout=30)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outputs)) == 1 and len(outputs[0]) >= 40
    assert (data_dir / "jwt_secret").read_text().strip() == outputs[0]
    assert stat.S_IMODE(os.stat(data_dir / "jwt_secret").st_mode) == 0o600
    # The token command uses that same secret.
    out = run_token_cli(env, "dev-9")
    assert verify_device_token(outputs[0], out.stdout.strip()) == "dev-9"
