"""Waking a ZeroMQ poll loop when a ring gets new records, without spinning.

A stage that waits on both a ring and sockets (monitor, publisher) polls its
sockets plus ``doorbell.inbox``.  Once its ``read`` found nothing it calls
``arm()``; the doorbell thread then blocks in ``reader.wait`` (the C helper's futex
wait, GIL released), pokes ``inbox`` once a record is committed past the last read
position, and disarms, so it never spins on records the loop already knows about.

**Coalescing, only under load.**  When a record is committed soon after the thread
started waiting -- less than ``coalesce`` seconds (``NODE_PIPELINE_COALESCE_MS``,
default 5 ms), or already there -- records are flowing: the thread waits ``coalesce``
before it pokes, so the loop wakes once for what a few producer groups committed
instead of once per group.  At 10,000 devices x 1 msg/s the web workers commit
~1,000 small groups a second; woken for each, the monitor and the publisher (and,
downstream, the router and the store) spent most of their CPU on per-wake and
per-batch overhead.  When the thread had waited ``coalesce`` or longer (the stage
was idle: a lone record, the first of a burst), it pokes at once, like Nagle's
rule of sending at once when nothing is outstanding.  The delay applies only when
the loop had drained the ring (an armed doorbell): under load the loop never waits
for it.  It adds at most ``coalesce`` per stage to the device -> store/fanout
latency, never to device acks (those follow the ingress persist).  Measured at
10,000 devices x 1 msg/s (``python -m bench compare --scenario c10k --targets
iotnode``, CPU-seconds of monitor + router + publisher + store per acked
message, consecutive runs): 64 us without, 46 us at 2 ms, 33 us at 5 ms.  (A rule
of at most one poke per ``coalesce`` was tried first: on a saturated machine the
late loop then got a poke at once after every read, smaller batches, more CPU
per message and a longer tail -- docs/fanout.md, "Latency".)

The reader is never used by both threads at once: the loop arms the doorbell only
after a ``read`` found nothing and does not ``read`` again until the thread has
disarmed it (``pop`` meanwhile is fine: it touches neither the wait position nor
the scan buffers).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import zmq

from node.config import Settings

WAIT = 5.0  # s: longest single block in the ring's wait (close() interrupts it)
COALESCE = Settings.pipeline_coalesce  # s: from the first committed record to the poke (its one default)


class Doorbell:
    def __init__(
        self, ctx: zmq.Context[zmq.Socket[bytes]], reader: Any, name: str, coalesce: float = COALESCE
    ) -> None:
        if coalesce < 0:
            raise ValueError(f"coalesce must be >= 0 seconds, got {coalesce!r}")
        self._coalesce = coalesce
        endpoint = f"inproc://{name}-doorbell-{id(self)}"
        self.inbox = ctx.socket(zmq.PAIR)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.bind(endpoint)
        self._out = ctx.socket(zmq.PAIR)
        self._out.setsockopt(zmq.LINGER, 0)
        self._out.setsockopt(zmq.SNDHWM, 2)
        self._out.connect(endpoint)
        self._reader = reader
        self._stop = threading.Event()
        self._armed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-doorbell", daemon=True)
        self._thread.start()

    def arm(self) -> None:
        self._armed.set()

    @property
    def armed(self) -> bool:
        return self._armed.is_set()

    def drain(self) -> None:
        """Take every queued poke (call when ``inbox`` polled readable)."""
        while True:
            try:
                self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _run(self) -> None:
        waiting_since: float | None = None  # when the wait for the next commit began
        while not self._stop.is_set():
            self._armed.wait()  # close() sets it too: no timed wake-ups while disarmed
            if self._stop.is_set():
                return
            if waiting_since is None:
                waiting_since = time.monotonic()
            if self._reader.wait(WAIT):
                if self._coalesce and time.monotonic() - waiting_since < self._coalesce:
                    self._stop.wait(self._coalesce)  # records are flowing: let a few more groups commit
                self._armed.clear()
                waiting_since = None
                try:
                    self._out.send(b"", zmq.NOBLOCK)
                except zmq.Again:
                    pass  # a poke is already queued: the loop will read anyway

    def close(self) -> None:
        self._stop.set()
        self._armed.set()
        for _ in range(50):  # bounded; again if the thread entered a wait after an interrupt
            if self._reader is not None and not self._reader.closed:
                self._reader.interrupt()
            self._thread.join(timeout=0.1)
            if not self._thread.is_alive():
                break
        self._out.close(linger=0)
        self.inbox.close(linger=0)
