"""SIGKILL and SIGSTOP of real producer/consumer processes sharing one ring file.

Producers report, after every append that returned, the last counter appended
(``tests/ring/_workers.py``).  Whatever instant a process is killed at, every
reported record must be delivered, exactly once (identified by its ring
position), in per-producer order, and nothing torn is ever delivered (every
payload is checked byte for byte).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from node.ring import Ring
from tests.ring._workers import make_payload, parse_payload
from tests.support import REPO, wait_until

CAP = 1 << 16


class Workers:
    """Worker processes started by a test, all SIGKILLed (by pid) at the end."""

    def __init__(self, tmp: Path, ring: Path, backend: str) -> None:
        self.tmp, self.ring, self.backend = tmp, ring, backend
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def start(self, role: str, *args: object) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{role}-{len(self.procs)}.out", "wb")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.ring._workers",
                role,
                str(self.ring),
                self.backend,
                *map(str, args),
            ],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        if sig == signal.SIGKILL:
            proc.wait(timeout=10)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=10)

    def failures(self) -> str:
        """Output of workers that died by themselves (a crash, not our SIGKILL)."""
        bad = []
        for i, proc in enumerate(self.procs):
            if proc.returncode not in (None, -signal.SIGKILL):
                bad.append(f"worker {i} exited {proc.returncode}")
        outs = [p.read_text(errors="replace") for p in sorted(self.tmp.glob("*.out"))]
        return "; ".join(bad) + "".join(o for o in outs if "Traceback" in o)


def acked(report: Path) -> int:
    """Highest counter a producer reported as appended (-1: none)."""
    if not report.exists():
        return -1
    lines = report.read_bytes().split(b"\n")[:-1]  # ignore an unterminated last line
    return int(lines[-1]) if lines else -1


def check_deliveries(deliveries: dict[int, tuple[int, int]], reports: dict[int, Path]) -> int:
    """deliveries: pos -> (producer, counter).  Returns how many records were checked."""
    per_producer: dict[int, list[int]] = defaultdict(list)
    for pos in sorted(deliveries):
        producer, counter = deliveries[pos]
        per_producer[producer].append(counter)
    for producer, counters in per_producer.items():
        assert counters == list(range(len(counters))), f"producer {producer}: gap, duplicate or reorder"
    for producer, report in reports.items():
        got = len(per_producer.get(producer, []))
        assert got >= acked(report) + 1, (
            f"producer {producer}: acked {acked(report)} but only {got} delivered"
        )
    return sum(len(c) for c in per_producer.values())


def test_producers_killed_mid_append_lose_no_acked_record(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "crash.ring"
    rng = random.Random(1234)
    workers = Workers(tmp_path, path, backend)
    reports: dict[int, Path] = {}
    deliveries: dict[int, tuple[int, int]] = {}
    slots: dict[int, subprocess.Popen[bytes]] = {}
    ring = Ring.open(path, capacity=CAP, backend=backend)
    reader = ring.reader()
    next_id = 0

    def spawn(slot: int) -> None:
        nonlocal next_id
        reports[next_id] = tmp_path / f"report-{next_id}"
        slots[slot] = workers.start("producer", next_id, reports[next_id], rng.randrange(1 << 30), 0.01)
        next_id += 1

    try:
        for slot in range(3):
            spawn(slot)
        kills = 0
        start = time.monotonic()
        next_kill = start + rng.uniform(0.2, 0.5)
        for _ in range(1_000_000):
            now = time.monotonic()
            # 4 s, longer (at most 40 s) on a loaded machine until enough kills landed
            if now > start + 40 or (
                now > start + 4 and kills >= 10 and len(deliveries) > 1000 and reader.settled_dead > 2
            ):
                break
            recs = reader.read(max_records=512)
            for r in recs:
                assert r.pos not in deliveries
                deliveries[r.pos] = parse_payload(r.payload)
            if recs:
                reader.pop(recs[-1].end)
            else:
                reader.wait(0.005)
            for slot, proc in list(slots.items()):
                if proc.poll() is not None:  # it killed itself inside an append
                    spawn(slot)
            if now >= next_kill:
                slot = rng.randrange(3)
                workers.kill(slots[slot])
                kills += 1
                spawn(slot)
                next_kill = now + rng.uniform(0.15, 0.4)
        workers.kill_all()
        for _ in range(100_000):  # drain, settling the dead producers' claims
            recs = reader.read(max_records=512)
            for r in recs:
                assert r.pos not in deliveries
                deliveries[r.pos] = parse_payload(r.payload)
            if recs:
                reader.pop(recs[-1].end)
            elif not reader.wait(0.05):
                break
        assert ring.bytes_used == 0 and ring.depth == 0
        assert not workers.failures(), workers.failures()
        checked = check_deliveries(deliveries, reports)
        assert kills >= 10 and checked > 1000 and reader.settled_dead > 2
    finally:
        workers.kill_all()
        ring.close()


def test_whole_node_killed_recovers_acked_unpopped_records(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "node.ring"
    rng = random.Random(99)
    workers = Workers(tmp_path, path, backend)
    reports: dict[int, Path] = {}
    deliveries: dict[int, tuple[int, int]] = {}
    next_id = 0
    recovered_records = 0
    for round_no in range(4):
        log = tmp_path / f"consumer-{round_no}.log"
        workers.procs.clear()
        for _ in range(3):
            reports[next_id] = tmp_path / f"report-{next_id}"
            workers.start("producer", next_id, reports[next_id], rng.randrange(1 << 30), 0.0005)
            next_id += 1
        workers.start("consumer", log)
        started = [reports[i] for i in range(next_id - 3, next_id)]
        wait_until(lambda started=started: all(r.exists() for r in started), 60, what="producers appending")
        time.sleep(rng.uniform(0.1, 0.6))
        procs = list(workers.procs)
        rng.shuffle(procs)
        for proc in procs:  # everything dies, in random order
            workers.kill(proc)
        assert not workers.failures(), workers.failures()
        popped_to = 0
        if log.exists():
            for line in log.read_bytes().split(b"\n")[:-1]:
                pos, producer, counter = map(int, line.split())
                assert deliveries.setdefault(pos, (producer, counter)) == (producer, counter)
        with Ring.open(path, capacity=CAP, backend=backend) as ring:
            assert ring.recovered
            popped_to = ring.head
            reader = ring.reader()
            for _ in range(10_000):
                recs = reader.read(max_records=512)
                if not recs:
                    break
                for r in recs:
                    assert r.pos >= popped_to
                    got = parse_payload(r.payload)
                    assert deliveries.setdefault(r.pos, got) == got, f"position {r.pos} delivered two records"
                recovered_records += len(recs)
                reader.pop(recs[-1].end)
            assert ring.depth == 0
    checked = check_deliveries(deliveries, reports)
    assert checked > 300 and recovered_records > 0


@pytest.mark.parametrize("stage", [0, 1])
def test_stopped_producer_holding_a_claim_is_not_skipped(tmp_path: Path, backend: str, stage: int) -> None:
    path = tmp_path / "stop.ring"
    workers = Workers(tmp_path, path, backend)
    ready = tmp_path / "ready"
    ring = Ring.open(path, capacity=CAP, backend=backend)
    try:
        reader = ring.reader()
        claimer = workers.start("claimer", stage, ready)
        wait_until(ready.exists, 15, what="the claimer")
        assert ring.append(make_payload(1, 0))
        os.kill(claimer.pid, signal.SIGSTOP)
        for _ in range(3):
            assert reader.read() == []  # blocked behind the live claim, never skipped
            assert reader.wait(0.03) is False
        assert ring.depth == 2
        workers.kill(claimer)  # now it is dead: the claim is settled
        assert reader.wait(1.0) is True
        recs = reader.read()
        got = [parse_payload(r.payload) for r in recs]
        # stage 1 wrote a valid payload + checksum: delivered; stage 0 did not: padding
        assert got == ([(99, 0)] if stage == 1 else []) + [(1, 0)]
        assert reader.settled_dead == 1
        reader.pop(recs[-1].end)
        assert ring.depth == 0
    finally:
        workers.kill_all()
        ring.close()


def test_claim_of_producer_dead_before_reopen_is_settled_by_recovery(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "dead.ring"
    workers = Workers(tmp_path, path, backend)
    for stage in (0, 1):
        ready = tmp_path / f"ready{stage}"
        proc = workers.start("claimer", stage, ready)
        wait_until(ready.exists, 15, what="the claimer")
        workers.kill(proc)
    with Ring.open(path, capacity=CAP, backend=backend) as ring:
        assert ring.recovered
        assert ring.append(make_payload(1, 0))
        got = [parse_payload(r.payload) for r in ring.reader().read()]
        assert got == [(99, 0), (1, 0)]  # the stage-0 claim became padding
        assert ring.depth == 2


def test_consumer_killed_between_read_and_pop_gets_the_records_again(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "reader.ring"
    with Ring.open(path, capacity=CAP, backend=backend) as ring:
        assert ring.append_batch([make_payload(5, i) for i in range(10)]) == 10
    workers = Workers(tmp_path, path, backend)
    log = tmp_path / "unpopped"
    try:
        proc = workers.start("reader_stalls", log)
        wait_until(lambda: log.exists() and log.read_text(), 15, what="the reader")
        workers.kill(proc)
    finally:
        workers.kill_all()
    unpopped = [int(p) for p in log.read_text().split()]
    with Ring.open(path, capacity=CAP, backend=backend) as ring:
        recs = ring.reader().read()
        assert [r.pos for r in recs] == unpopped
        assert [parse_payload(r.payload) for r in recs] == [(5, i) for i in range(5, 10)]
        assert ring.depth == 5


def test_child_forked_after_open_claims_under_its_own_identity(tmp_path: Path, backend: str) -> None:
    # The at-fork hook gives the child its own (pid, start time): a claim it leaves
    # when it dies is settled, instead of waiting forever on the (alive) parent.
    path = tmp_path / "fork.ring"
    with Ring.open(path, capacity=CAP, backend=backend) as ring:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                ring._append_partial([make_payload(7, 0)], 0)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert ring.append(make_payload(7, 1))
        reader = ring.reader()
        assert reader.wait(2.0)
        assert [parse_payload(r.payload) for r in reader.read()] == [(7, 1)]
        assert reader.settled_dead == 1
