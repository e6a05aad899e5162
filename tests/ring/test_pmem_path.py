"""The libpmem persistent-memory path (``backend="pmem"``: persist = cache flush).

libpmem decides ``pmem_is_pmem`` once per process from ``PMEM_IS_PMEM_FORCE``, so
the ring tests for the pmem backend run in a child pytest with that variable set
(on the ordinary tmp directory: the flush path is what is exercised, not media).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import REPO

from .conftest import HAVE_LIBPMEM, PMEM_FORCED


@pytest.mark.skipif(not HAVE_LIBPMEM, reason="libpmem.so.1 is not installed (the mmap fallback is tested)")
@pytest.mark.skipif(PMEM_FORCED, reason="already inside the forced child run")
def test_ring_suite_passes_on_pmem_backend_in_forced_child() -> None:
    env = dict(os.environ, PMEM_IS_PMEM_FORCE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/ring",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "pmem and not forced_child",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 25, summary
