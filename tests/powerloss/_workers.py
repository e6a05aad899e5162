"""Producer processes of the multi-process power-loss test.

``python -m tests.powerloss._workers producer PATH ID REPORT SEED DIE_RATE``
appends batches of records ``(ID << 24) + counter`` (``tests.powerloss._sim.payload``)
to the ring at PATH (``IOTNODE_RING_POWERSIM=1`` in the environment: backend "auto"
is the simulator) and, after every append that returned, writes ``first count`` as
one line to REPORT: those records are acked.  With probability DIE_RATE per batch
it instead stops inside an append (claimed / written / persisted, never committed)
and SIGKILLs itself.  Bounded to 60 s.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time

from node.ring import Ring

from ._sim import payload


def producer(path: str, producer_id: int, report: str, seed: int, die_rate: float) -> None:
    rng = random.Random(seed)
    ring = Ring.open(path, capacity=1 << 14)
    fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    counter = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        first = (producer_id << 24) + counter
        batch = [payload(first + i, rng.randrange(10, 300)) for i in range(rng.choice((1, 1, 2, 5)))]
        if die_rate and rng.random() < die_rate:
            ring._append_partial(batch, rng.choice((0, 1, 3)))
            os.kill(os.getpid(), signal.SIGKILL)
        n = ring.append_batch(batch)
        if n:
            os.write(fd, f"{first} {n}\n".encode())
            counter += n
        else:
            time.sleep(0.001)  # full: back-pressure


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    assert role == "producer", role
    producer(args[0], int(args[1]), args[2], int(args[3]), float(args[4]))
