"""In-process producers, a dead producer and the consumer of one simulated ring.

Every operation is followed by :meth:`Harness.cut_check`: a legal post-crash image
is taken (:func:`node.ring.powersim.crash_image`) and recovered on a scratch copy
while the live ring goes on.  ``power_cut`` does it for real: everything closed,
the image installed, the ring reopened (recovered) and the run continued.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from node.ring import Reader, Ring
from node.ring.liveness import identity, start_time
from node.ring.powersim import crash_image, install_image, pop_before_persist, set_test_flags

from ._sim import Books, check_cut, parse, payload

CAP = 4096  # small: every few operations wrap


def _other_live_identity() -> tuple[int, int]:
    """A second live identity for the second in-process producer (the parent process)."""
    ppid = os.getppid()
    token = start_time(ppid)
    return (ppid, token) if ppid > 1 and token is not None else identity()


class Harness:
    def __init__(self, directory: Path, rng: random.Random, flags: int = 0, granularity: int = 64) -> None:
        self.path = directory / "sim.ring"
        self.scratch = directory / "scratch.ring"
        self.rng = rng
        self.flags = flags
        self.granularity = granularity
        self.books = Books()
        self.next_id = 1
        self.problems: list[str] = []
        self._open()

    # ------------------------------------------------------------------ lifecycle
    def _open(self) -> None:
        self.producers = [Ring.open(self.path, capacity=CAP, backend="sim") for _ in range(2)]
        self.producers[1]._set_identity(*_other_live_identity())
        self.dead = Ring.open(self.path, capacity=CAP, backend="sim")
        pid, token = identity()
        self.dead._set_identity(pid, token + 1)  # start time mismatch: counted as dead
        for ring in (*self.producers, self.dead):
            set_test_flags(ring, self.flags)
        self.reader: Reader = self.producers[0].reader()
        self.books.max_epoch = max(self.books.max_epoch, self.producers[0].epoch)
        self.last_read: list[tuple[int, int, int]] = []  # (pos, end, rid) from the head
        self.pending_pop: int | None = None

    def close(self) -> None:
        for ring in (*self.producers, self.dead):
            ring.close()

    def _ids(self, n: int) -> list[int]:
        rids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        self.books.attempted.update(rids)
        return rids

    # ------------------------------------------------------------------ operations
    def append(self, who: int, sizes: list[int]) -> None:
        rids = self._ids(len(sizes))
        n = self.producers[who].append_batch([payload(r, s) for r, s in zip(rids, sizes, strict=True)])
        self.books.ack(rids[:n])

    def dead_claim(self, stage: int, sizes: list[int]) -> None:
        """A producer that dies (stage 0/1: before its persist, 2: just before it, 3: after it)."""
        rids = self._ids(len(sizes))
        self.dead._append_partial([payload(r, s) for r, s in zip(rids, sizes, strict=True)], stage)

    def _finish_pop(self) -> None:
        if self.pending_pop is not None:
            self.reader.pop(self.pending_pop)  # releases nothing new: persists and publishes
            self.books.popped |= self.books.maybe_popped
            self.books.maybe_popped = set()
            self.pending_pop = None

    def read(self, k: int) -> None:
        self._finish_pop()
        ring = self.producers[0]
        recs = self.reader.read(ring.head, max_records=k)
        self.last_read = []
        for rec in recs:
            rid = parse(rec.payload)
            if rid is None:
                self.problems.append(f"the reader delivered garbage at {rec.pos}")
                continue
            self.books.seen[rid] = rec.pos
            self.last_read.append((rec.pos, rec.end, rid))

    def pop(self, k: int, frozen: bool = False) -> None:
        """Pop the first ``k`` records of the last read; ``frozen``: stop before the persist."""
        self._finish_pop()
        k = min(k, len(self.last_read))
        if not k:
            return
        to = self.last_read[k - 1][1]
        rids = {rid for _, _, rid in self.last_read[:k]}
        if frozen:
            pop_before_persist(self.reader, to)
            self.books.maybe_popped |= rids
            self.pending_pop = to
        else:
            self.reader.pop(to)
            self.books.popped |= rids
        del self.last_read[:k]

    # ------------------------------------------------------------------ power cuts
    def cut_check(self, keep: float | None = None) -> list[tuple[int, int]]:
        """Cut the power on a copy; record violations; returns what recovery delivered."""
        if keep is None:
            keep = self.rng.choice((0.0, 0.0, 0.5, 0.9, 1.0))
        image = crash_image(self.path, self.rng, self.granularity, keep)
        problems, got = check_cut(image, self.scratch, self.books)
        self.problems.extend(problems)
        return got

    def power_cut(self, keep: float | None = None) -> None:
        """A real cut: the image becomes the ring, which is reopened (recovered) and goes on."""
        if keep is None:
            keep = self.rng.choice((0.0, 0.5, 1.0))
        image = crash_image(self.path, self.rng, self.granularity, keep)
        problems, got = check_cut(image, self.scratch, self.books)
        self.problems.extend(problems)
        self.close()
        install_image(self.path, image)
        present = {rid for _, rid in got}
        self.books.popped |= self.books.maybe_popped - present
        self.books.maybe_popped = set()
        self.books.required = present - self.books.popped  # recovery persisted them: durable now
        self._open()
        if not self.producers[0].recovered:
            self.problems.append("reopening after the cut did not recover")

    def run(self, program: list[tuple[str, int, list[int]]]) -> list[str]:
        """Run ``(op, arg, sizes)`` steps, a power cut checked after each; returns the violations."""
        try:
            for op, arg, sizes in program:
                if op == "append":
                    self.append(arg % 2, sizes)
                elif op == "dead":
                    self.dead_claim(arg % 4, sizes)
                elif op == "read":
                    self.read(max(1, arg))
                elif op == "pop":
                    self.pop(arg)
                elif op == "pop_frozen":
                    self.pop(arg, frozen=True)
                elif op == "cut":
                    self.power_cut()
                    continue
                self.cut_check()
                if self.problems:
                    break
        finally:
            self.close()
        return self.problems


OPS = ("append", "append", "append", "dead", "read", "pop", "pop_frozen", "cut")


def random_program(rng: random.Random, length: int, max_size: int = 300) -> list[tuple[str, int, list[int]]]:
    return [
        (rng.choice(OPS), rng.randrange(8), [rng.randrange(10, max_size) for _ in range(rng.randrange(1, 5))])
        for _ in range(length)
    ]
