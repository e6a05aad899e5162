"""Real producer processes, frozen (SIGSTOP) at random instants while the power is cut.

Four producer processes (two of them die inside appends now and then) share a
16 KiB simulated ring with the consumer in this process.  Each round the consumer
reads and pops for a few ms, then every producer is frozen, a legal post-crash image
is taken and recovered on a scratch copy (invariant in ``_sim.py``), and they go on.
At the end the power is cut for real: every process killed, the image installed,
the ring reopened.  All three simulator models.  ``IOTNODE_POWERSIM_ROUNDS`` (default 20) runs more.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.ring import Ring
from node.ring.backend import POWERSIM_ENV, POWERSIM_MODEL_ENV
from node.ring.powersim import crash_image, install_image

from ._sim import Books, check_cut, parse

ROUNDS = int(os.environ.get("IOTNODE_POWERSIM_ROUNDS", "20"))
REPO = Path(__file__).resolve().parents[2]
MODELS = {"pmem": 64, "pmem-nt": 64, "msync": 512}  # simulator model -> unit a cut keeps or loses


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return True  # gone
    return state in (b"T", b"t", b"Z", b"X")


def _acked(reports: list[Path], books: Books) -> None:
    for report in reports:
        if report.exists():
            for line in report.read_text().splitlines():
                first, n = map(int, line.split())
                books.ack((rid for rid in range(first, first + n) if rid not in books.acked), first >> 24)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_producer_processes_frozen_at_random_instants_lose_nothing_acked(
    shm_dir: Path, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(POWERSIM_MODEL_ENV, model)  # inherited by the producers
    granularity = MODELS[model]
    path = shm_dir / "mp.ring"
    scratch = shm_dir / "scratch.ring"
    rng = random.Random(int(os.environ.get("IOTNODE_POWERSIM_SEED", "12")))
    ids = (1, 2, 3, 4)
    books = Books(attempted_ok=lambda rid: (rid >> 24) in ids)
    ring = Ring.open(path, capacity=1 << 14, backend="sim")
    books.max_epoch = ring.epoch
    reader = ring.reader()
    env = dict(os.environ, PYTHONPATH=str(REPO), **{POWERSIM_ENV: "1"})
    reports = [shm_dir / f"report-{i}" for i in ids]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.powerloss._workers",
                "producer",
                str(path),
                str(i),
                str(reports[k]),
                str(rng.randrange(1 << 30)),
                "0" if i <= 2 else "0.01",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for k, i in enumerate(ids)
    ]
    unpopped: list[tuple[int, int]] = []  # (end, rid) read and not popped
    problems: list[str] = []
    deadline = time.monotonic() + 90
    try:
        for _ in range(ROUNDS):
            if time.monotonic() > deadline:
                break
            slice_end = time.monotonic() + rng.uniform(0.02, 0.1)
            while time.monotonic() < slice_end:
                recs = reader.read(max_records=rng.randrange(1, 64))
                for rec in recs:
                    rid = parse(rec.payload)
                    assert rid is not None, f"the reader delivered garbage at {rec.pos}"
                    books.seen[rid] = rec.pos
                    unpopped.append((rec.end, rid))
                if unpopped and rng.random() < 0.5:
                    k = rng.randrange(len(unpopped))
                    reader.pop(unpopped[k][0])
                    books.popped.update(rid for _, rid in unpopped[: k + 1])
                    del unpopped[: k + 1]
                if not recs:
                    reader.wait(0.005)
            live = [p for p in procs if p.poll() is None]
            for p in live:
                p.send_signal(signal.SIGSTOP)
            for p in live:
                for _ in range(1000):  # bounded: 1 s
                    if _stopped(p.pid):
                        break
                    time.sleep(0.001)
            _acked(reports, books)  # read after the freeze: every line is an append that returned
            image = crash_image(path, rng, granularity, rng.choice((0.0, 0.3, 0.7, 1.0)))
            found, _ = check_cut(image, scratch, books)
            problems.extend(found)
            for p in live:
                p.send_signal(signal.SIGCONT)
            assert not problems, problems
        # The real cut: every process dies at once, the image becomes the ring.
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=10)
        _acked(reports, books)
        image = crash_image(path, rng, granularity, 0.5)
        reader.close()
        ring.close()
        install_image(path, image)
        with Ring.open(path, backend="sim") as again:
            assert again.recovered and again.epoch > books.max_epoch
            present = set()
            for _ in range(1000):
                recs = again.reader().read(max_records=4096)
                if not recs:
                    break
                present.update(parse(r.payload) for r in recs)
            lost = (set(books.acked) | set(books.seen)) - books.popped - present
            assert not lost, sorted(lost)[:10]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        reader.close()
        ring.close()
    assert not problems, problems
    assert len(books.acked) > 200, f"only {len(books.acked)} records acked: the test exercised too little"
    assert books.popped, "nothing was popped"
