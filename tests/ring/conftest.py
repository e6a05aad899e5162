"""Fixtures of the ring tests: real ring files on each backend.

``msync`` (libpmem on an ordinary file) and ``mmap`` (the Python fallback) run in
every process.  The ``pmem`` path needs libpmem to treat the mapping as persistent
memory, which libpmem decides once per process from ``PMEM_IS_PMEM_FORCE``; so it
runs here only when that variable is set, and ``test_pmem_path.py`` re-runs these
tests in a child pytest with ``PMEM_IS_PMEM_FORCE=1``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.ring.backend import load_libpmem

PMEM_FORCED = os.environ.get("PMEM_IS_PMEM_FORCE") == "1"
HAVE_LIBPMEM = load_libpmem() is not None

BACKENDS = (["pmem"] if PMEM_FORCED else []) + (["msync"] if HAVE_LIBPMEM else []) + ["mmap"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ring_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "test.ring"
