"""node.pipeline.doorbell against a real ring file and real ZeroMQ inproc sockets."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

from node.pipeline.doorbell import Doorbell
from node.ring import Ring


def _poke_after_append(
    tmp_path: Path,
    coalesce: float,
    appends: int,
    spacing: float,
    poked_before: bool = False,
    quiet: float = 0.05,
) -> tuple[float, int, int]:
    """Arm, wait ``quiet`` s, append ``appends`` records ``spacing`` s apart; return
    (seconds from the first append to the poke, records readable at the poke, pokes
    queued).  With ``poked_before``, one record is appended, poked and read first, and
    the records follow that poke at once (records are flowing: under load)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with Ring.open(tmp_path / "d.ring", capacity=1 << 20) as ring:
        reader = ring.reader()
        assert reader.read() == []
        bell = Doorbell(ctx, reader, "test", coalesce)
        try:
            if poked_before:
                bell.arm()
                assert ring.append(b"first")
                assert bell.inbox.poll(5000), "no poke within 5 s"
                bell.drain()
                assert len(reader.read()) == 1
            bell.arm()
            time.sleep(0.0 if poked_before else quiet)  # the thread is blocked in reader.wait
            t0 = time.monotonic()
            for i in range(appends):
                assert ring.append(b"r%d" % i)
                time.sleep(spacing)
            assert bell.inbox.poll(5000), "no poke within 5 s"
            took = time.monotonic() - t0
            readable = len(reader.read())
            pokes = 0
            while bell.inbox.poll(50):
                bell.inbox.recv()
                pokes += 1
            assert not bell.armed, "a poke disarms the doorbell"
            return took, readable, pokes
        finally:
            bell.close()
            ctx.term()


def test_under_load_a_drained_stage_is_poked_once_for_records_committed_within_the_coalescing_delay(
    tmp_path: Path,
) -> None:
    took, readable, pokes = _poke_after_append(
        tmp_path, coalesce=0.4, appends=5, spacing=0.01, poked_before=True
    )
    assert took >= 0.3, "poked again before the coalescing delay since the previous poke"
    assert readable == 5, "the records committed during the delay are read with the first"
    assert pokes == 1


def test_after_a_quiet_spell_the_first_commit_pokes_at_once_whatever_the_coalescing(
    tmp_path: Path,
) -> None:
    """A lone record (or the first of a burst) is not held back: coalescing only under load."""
    took, readable, pokes = _poke_after_append(tmp_path, coalesce=0.4, appends=1, spacing=0.0, quiet=0.6)
    assert took < 0.2  # generous: a loaded machine; the 0.4 s delay is the contrast
    assert readable == 1
    assert pokes == 1


def test_a_commit_soon_after_the_wait_began_is_coalesced_records_are_flowing(tmp_path: Path) -> None:
    took, readable, pokes = _poke_after_append(tmp_path, coalesce=0.4, appends=3, spacing=0.01, quiet=0.05)
    assert took >= 0.3, "poked before the coalescing delay although records were flowing"
    assert readable == 3
    assert pokes == 1


def test_without_coalescing_the_first_commit_pokes_at_once(tmp_path: Path) -> None:
    took, readable, _ = _poke_after_append(tmp_path, coalesce=0.0, appends=1, spacing=0.0)
    assert took < 0.2  # generous: a loaded machine; the 0.4 s delay above is the contrast
    assert readable == 1


def test_a_negative_delay_is_refused_naming_it() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        with pytest.raises(ValueError, match="-0.5"):
            Doorbell(ctx, reader=None, name="bad", coalesce=-0.5)
    finally:
        ctx.term()
