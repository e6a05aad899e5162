"""Fixtures of the power-loss tests: the ring's test-only simulator backend.

``IOTNODE_RING_POWERSIM=1`` is set per test (monkeypatch), never for the whole
session, so other tests collected alongside keep their real backends.  Ring files
live in /dev/shm when it exists (the checks reopen copies thousands of times).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.ring.backend import POWERSIM_ENV, POWERSIM_MODEL_ENV


def pytest_configure(config: pytest.Config) -> None:
    # hypothesis' failure report touches a deprecated mypy_extensions name; with
    # filterwarnings = error that hides the falsifying example behind an INTERNALERROR.
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
    )


@pytest.fixture(autouse=True)
def powersim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(POWERSIM_ENV, "1")
    monkeypatch.delenv(POWERSIM_MODEL_ENV, raising=False)


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="powerloss-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
