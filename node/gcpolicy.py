"""Garbage-collector policy for a server that holds many long-lived objects.

CPython's cyclic GC is generational: a full (generation 2) collection traverses
every tracked object, and it runs automatically whenever the objects promoted to
generation 2 since the last one reach 25 % of those that survived it.  A web
worker holding 5,000-10,000 WebSocket connections keeps ~1-2 million tracked
objects alive (uvicorn protocol, websockets state machine, Starlette WebSocket,
tasks, coroutine frames, our ``Conn``), so each of those automatic full passes
froze the event loop for 0.5-4 s on the shared 2-core machine (measured with
``gc.callbacks`` in the workers; py-spy: ~45-50 % of the main thread's samples in
``gc_collect_main``).  Messages that arrived during a pause then lived long
enough to be promoted, the young generations grew to 40-90k objects per
collection (the net allocation count that triggers a young collection is
decremented by the *old* messages being freed, so a FIFO backlog never looks
"young"), and the worker spiralled into multi-second ack stalls (issues 3 and 6).

The policy (one per worker, started by the front's lifespan):

* automatic full collections are off (``threshold2`` set out of reach), and
  automatic young collections rarer (:data:`YOUNG_THRESHOLD` allocations instead
  of 700);
* every :data:`FREEZE_INTERVAL` seconds, :func:`gc.freeze` moves every object
  that survived so far to the permanent generation (an O(1) list splice, ~2 us).
  Connections accepted after start-up are thus frozen within a fraction of a
  second, and no collection ever traverses more than one interval's survivors;
* a young collection (``gc.collect(1)``) runs before the freeze only when the
  interval was *dirty*: the front calls :meth:`GcPolicy.note_garbage` when a
  connection begins or ends, the events that leave cyclic garbage (handshake
  parsing; protocol <-> transport <-> task of a closed connection).  Steady traffic leaves none (every such
  collection at 10k devices x 1 msg/s collected 0 objects) but each one cost
  8-27 ms of a stalled loop for the interval's ~20k survivors, a p99 floor of its
  own;
* frozen objects are still freed by reference counting; only *cyclic* garbage
  among them waits.  It is reclaimed by a *compaction* (``unfreeze``, full
  collection, ``freeze``, logged with its duration) when the interpreter's
  allocated memory blocks (:func:`sys.getallocatedblocks`, a walk over pool
  headers: ~0.2 ms for a 150 MB heap) have grown to :data:`COMPACT_GROWTH` times
  their number after the previous compaction: memory held by dead cycles stays
  bounded, and a steady set of connections never triggers one.  Growth alone is
  not garbage: a ramp of new connections doubles memory without a single dead
  cycle, so a doubling compacts only if some connection has *ended* since the last
  compaction (its frozen objects are the cyclic garbage); while connections only
  begin, their memory is live and becomes the new baseline; growth to
  ``COMPACT_GROWTH ** 2`` that neither explains compacts anyway, a safety net for
  cycles made elsewhere.  (A ramp to 5,000 connections per worker used to compact
  3-4 times, the last one 0.4-0.7 s just as the devices started sending.)  (Counting the
  permanent generation instead, :func:`gc.get_freeze_count`, walks a linked list
  of every frozen object: 120-175 ms of stalled loop every 5 s at 5,000
  connections per worker, the periodic stall that kept p99 over 100 ms.)
  Compactions cost what an automatic full pass cost before, but happen once per
  doubling (a ramp to 10k connections: a few, none afterwards) instead of every
  +25 %.

**Idle back-off** (issue 16).  A tick that finds the interval *quiet* -- not dirty,
and fewer than :data:`QUIET_OBJECTS` net new tracked objects since the last freeze
(``gc.get_count()[0]``: the freeze resets it) -- has nothing to freeze; the next
sleep doubles, up to :data:`IDLE_INTERVAL` (an idle worker ticked 4 times a second
for nothing).  A busy tick goes back to ``interval`` at once, and
:meth:`GcPolicy.note_garbage` reschedules a backed-off tick to ``interval`` from
now: a connection that begins after a quiet spell is collected and frozen as
soon as before.  While traffic allocates, nothing changes: every tick is busy.

:meth:`GcPolicy.restore` puts the interpreter's thresholds back and unfreezes
(tests, shutdown).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time

__all__ = ["COMPACT_GROWTH", "FREEZE_INTERVAL", "IDLE_INTERVAL", "GcPolicy"]

log = logging.getLogger("iotnode.gc")

FREEZE_INTERVAL = 0.25  # seconds between freezes of the young survivors
IDLE_INTERVAL = 4.0  # s: the longest sleep between ticks once they find nothing to do
#: a tick that finds fewer net new tracked objects than this (and no note_garbage) is quiet
QUIET_OBJECTS = 200
#: freezes between two growth checks (sys.getallocatedblocks: ~0.2 ms for a 150 MB heap)
CHECK_EVERY = 4
COMPACT_GROWTH = 2.0  # compact when the allocated blocks reached this many times their last count
COMPACT_FLOOR = 500_000  # never compact below this many allocated blocks
#: allocations between automatic young collections (CPython: 700).  Each interval's
#: survivors are frozen at the tick anyway; at 700 the workers ran
#: 25-45 young collections a second, 15-40 % of their CPU (thread time, 10k devices).
YOUNG_THRESHOLD = 20_000
_NO_AUTO_FULL = 1 << 30  # threshold2: young collections between full ones, out of reach


class GcPolicy:
    """Freeze long-lived objects, never run an automatic full collection, compact on memory growth."""

    def __init__(
        self,
        *,
        interval: float = FREEZE_INTERVAL,
        check_every: int = CHECK_EVERY,
        growth: float = COMPACT_GROWTH,
        floor: int = COMPACT_FLOOR,
        idle_interval: float = IDLE_INTERVAL,
    ) -> None:
        if interval <= 0 or check_every < 1 or growth <= 1 or floor < 0 or idle_interval < interval:
            raise ValueError(
                "expected interval > 0, check_every >= 1, growth > 1, floor >= 0, idle_interval >= "
                f"interval, got {interval}, {check_every}, {growth}, {floor}, {idle_interval}"
            )
        self.interval = interval
        self.idle_interval = idle_interval
        self.sleep = interval  # until the next tick: interval, doubled per quiet tick up to idle_interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due: asyncio.Future[None] | None = None
        self.check_every = check_every
        self.growth = growth
        self.floor = floor
        self.compactions = 0
        self.compaction_seconds = 0.0
        self.compaction_max_seconds = 0.0
        self._baseline = 0  # allocated blocks after start-up or the last compaction
        self._ticks = 0
        self._dirty = False  # cyclic garbage may have been made since the last tick
        self._ended = 0  # connections ended since start-up or the last compaction
        self._begun = 0  # connections begun since the last growth check
        self._saved_threshold: tuple[int, int, int] | None = None

    def start(self) -> None:
        """Collect and freeze what start-up built; switch automatic full collections off."""
        if self._saved_threshold is None:
            self._saved_threshold = gc.get_threshold()
        _, gen1, _ = self._saved_threshold
        gc.collect()
        gc.freeze()
        gc.set_threshold(YOUNG_THRESHOLD, gen1, _NO_AUTO_FULL)
        self._baseline = sys.getallocatedblocks()

    def note_garbage(self, *, ended: bool = False) -> None:
        """Say that cyclic garbage was probably made (a connection began, or ended:
        ``ended=True``): the next tick runs a young collection before it freezes."""
        self._dirty = True
        if ended:
            self._ended += 1
        else:
            self._begun += 1
        if self.sleep > self.interval:  # backed off: tick one interval from now, not later
            self.sleep = self.interval
            self._schedule(self.interval)

    def tick(self) -> None:
        """One period: a young collection if dirty, freeze, now and then the growth check;
        sets :attr:`sleep` (back off while quiet)."""
        busy = self._dirty or gc.get_count()[0] >= QUIET_OBJECTS
        self.sleep = self.interval if busy else min(self.sleep * 2, self.idle_interval)
        if self._dirty:
            self._dirty = False
            gc.collect(1)
        gc.freeze()
        self._ticks += 1
        if self._ticks % self.check_every == 0:
            self._check_growth(sys.getallocatedblocks())

    def _check_growth(self, blocks: int) -> None:
        begun, self._begun = self._begun, 0
        if self._ended:
            # Connections died: their frozen cycles are garbage.  Compact once that can
            # have doubled memory.
            if blocks >= self.floor and blocks >= self.growth * self._baseline:
                self.compact()
        elif begun:
            # Only new connections: their growth is live memory, the new baseline.
            self._baseline = max(self._baseline, blocks)
        elif blocks >= self.floor and blocks >= self.growth**2 * self._baseline:
            self.compact()  # growth nothing explains: a safety net for cycles made elsewhere

    def compact(self) -> int:
        """Unfreeze, run a full collection, freeze again; return the objects collected."""
        before = sys.getallocatedblocks()
        t0 = time.perf_counter()
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        took = time.perf_counter() - t0
        self._baseline = sys.getallocatedblocks()
        self._ended = 0
        self.compactions += 1
        self.compaction_seconds += took
        self.compaction_max_seconds = max(self.compaction_max_seconds, took)
        log.info(
            "gc: compaction at %d allocated blocks took %.0f ms, collected %d objects (now %d blocks)",
            before,
            took * 1e3,
            collected,
            self._baseline,
        )
        return collected

    async def run(self) -> None:
        """:meth:`tick` every :attr:`sleep` seconds until cancelled."""
        self._loop = asyncio.get_running_loop()
        try:
            while True:
                self._due = self._loop.create_future()
                self._schedule(self.sleep)
                await self._due
                self.tick()
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._loop = self._timer = self._due = None

    def _schedule(self, delay: float) -> None:
        """(Re)arm the timer that ends the current sleep ``delay`` s from now."""
        if self._loop is None or self._due is None:
            return  # not running (unit tests call tick() themselves)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(delay, self._end_sleep, self._due)

    @staticmethod
    def _end_sleep(due: asyncio.Future[None]) -> None:
        if not due.done():
            due.set_result(None)

    def restore(self) -> None:
        """Give the interpreter its thresholds back and unfreeze everything."""
        if self._saved_threshold is not None:
            gc.set_threshold(*self._saved_threshold)
            self._saved_threshold = None
        gc.unfreeze()
