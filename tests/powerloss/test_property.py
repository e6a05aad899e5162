"""Property: at every step of random interleavings, a power cut loses nothing acked.

Two in-process producers (distinct live identities), a dead producer whose claims
stop at every stage of an append, the consumer reading and popping (also frozen in
the middle of a pop), wraps of a 4 KiB ring, real power cuts with restart; after
every operation a legal post-crash image is recovered and checked (the invariant is
in ``tests/powerloss/_sim.py``).  Three persistence models: pmem (64-byte lines,
``persist_range``), pmem-nt (every append on the pmem batch path: non-temporal
payload lines + flushed header/edge lines) and msync (pages persisted; 512-byte
sectors lost or kept independently).

``IOTNODE_POWERSIM_EXAMPLES`` (default 60 per model) runs more: the soak.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.ring.backend import POWERSIM_MODEL_ENV
from node.ring.powersim import LEGACY_COMMIT, LEGACY_HEAD, LEGACY_RESOLVE

from ._harness import OPS, Harness, random_program

EXAMPLES = int(os.environ.get("IOTNODE_POWERSIM_EXAMPLES", "60"))
MODELS = {"pmem": 64, "pmem-nt": 64, "msync": 512}

step = st.tuples(
    st.sampled_from(OPS),
    st.integers(0, 7),
    st.lists(st.integers(10, 400), min_size=1, max_size=5),
)


@pytest.mark.parametrize("model", sorted(MODELS))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(program=st.lists(step, min_size=5, max_size=40), seed=st.integers(0, 1 << 32))
def test_no_acked_or_seen_record_is_lost_at_any_power_cut(
    model: str,
    program: list[tuple[str, int, list[int]]],
    seed: int,
    shm_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(POWERSIM_MODEL_ENV, model)
    directory = Path(tempfile.mkdtemp(dir=shm_dir))
    problems = Harness(directory, random.Random(seed), granularity=MODELS[model]).run(program)
    assert problems == []


@pytest.mark.parametrize(
    "flags",
    [LEGACY_HEAD, LEGACY_COMMIT, LEGACY_RESOLVE],
    ids=["head-before-persist", "commit-before-persist", "resolve-header-only"],
)
def test_the_simulator_catches_each_legacy_ordering_in_random_programs(flags: int, shm_dir: Path) -> None:
    # The same random exploration, with the ring switched back to one pre-issue-12
    # ordering: the checker must report a loss within a bounded number of programs.
    found: list[str] = []
    for seed in range(300):
        directory = shm_dir / f"legacy{seed}"
        directory.mkdir()
        rng = random.Random(seed)
        found = Harness(directory, rng, flags=flags).run(random_program(rng, 40))
        if found:
            break
    assert found, "the simulator did not catch the broken ordering"
    assert any("lost" in p or "came back" in p for p in found), found
