"""Waking a ZeroMQ poll loop when a ring gets new records, without spinning.

A stage that waits on both a ring and sockets (monitor, publisher) polls its
sockets plus ``doorbell.inbox``.  Once its ``read`` found nothing it calls
``arm()``; the doorbell thread then blocks in ``reader.wait`` (the C helper's futex
wait, GIL released), pokes ``inbox`` once a record is committed past the last read
position, and disarms, so it never spins on records the loop already knows about.

The reader is never used by both threads at once: the loop arms the doorbell only
after a ``read`` found nothing and does not ``read`` again until the thread has
disarmed it (``pop`` meanwhile is fine: it touches neither the wait position nor
the scan buffers).
"""

from __future__ import annotations

import threading
from typing import Any

import zmq

WAIT = 0.2  # s: longest single block, bounds how long close() waits for the thread


class Doorbell:
    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], reader: Any, name: str) -> None:
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
        while not self._stop.is_set():
            if not self._armed.wait(WAIT):
                continue
            if self._reader.wait(WAIT):
                self._armed.clear()
                try:
                    self._out.send(b"", zmq.NOBLOCK)
                except zmq.Again:
                    pass  # a poke is already queued: the loop will read anyway

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * WAIT + 1)
        self._out.close(linger=0)
        self.inbox.close(linger=0)
