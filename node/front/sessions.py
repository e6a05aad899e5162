"""One session per device: a new connection of a device takes over its older one.

What MQTT brokers do with a client id, across every web worker of the node:

* Each connection of device D gets a *stamp* ``(time.monotonic_ns(), pid)`` when
  its token is accepted (CLOCK_MONOTONIC is one clock for every process of the
  machine), so any two sessions of D are ordered: the newer one wins.
* Before it accepts the upgrade, the new session asks every *older* session of D
  to end: in its own worker directly, in the other workers by a ``TAKE`` datagram
  on their Unix socket ``NODE_DATA_DIR/sessions/<pid>.sock``.  An older session
  stops taking frames (what it has not read is not acked: the device resends it
  on its new connection) and waits until every record it handed to the committer is
  durable in the ring (*settled*: its ack is then due); its worker answers ``DONE``
  then.  The old connection sends that last ack and is closed with **4000 "session
  taken over"** as soon as its peer takes them (a peer that reads nothing does not
  hold the new session back: ``NODE_TCP_USER_TIMEOUT_MS`` ends it).
* Only then is the new session accepted, so the device's records enter the ring
  in order across workers: everything of the old session is durable before
  anything of the new one is read.  If an older session cannot settle within
  :data:`SETTLE_TIMEOUT` (a full ring holds it back), the new connection is
  refused with HTTP 503 (the device retries) rather than break per-device order.
* A session that learns of a *newer* one (two connections racing) is closed with
  4000 itself (before its upgrade if it was not accepted yet).
* A session whose connection has already gone stays registered until its
  records are durable, so a device that reconnects at once to another worker
  still waits for them.

A worker that died leaves a socket file nobody reads: sending to it fails with
ECONNREFUSED and the file is removed.  A worker that does not answer within
:data:`SETTLE_TIMEOUT` is treated like an unsettled session (503).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

__all__ = ["CLOSE_TAKEN_OVER", "REASON_TAKEN_OVER", "SETTLE_TIMEOUT", "Session", "Sessions", "TakeoverFailed"]

log = logging.getLogger("iotnode.sessions")

CLOSE_TAKEN_OVER = 4000
REASON_TAKEN_OVER = "session taken over"
#: Longest a new connection waits for the older sessions of its device to settle.
SETTLE_TIMEOUT = 5.0
_POLL = 0.005  # seconds between checks of an old session's pending records

Stamp = tuple[int, int]


class TakeoverFailed(Exception):
    """An older session of the device did not settle in time (answer 503)."""


class Session:
    """One connection of a device in this worker."""

    __slots__ = ("device_id", "stamp", "pending", "taken", "gone", "settled", "taken_event", "_on_taken")

    def __init__(self, device_id: str, stamp: Stamp, pending: Callable[[], bool]) -> None:
        self.device_id = device_id
        self.stamp = stamp
        self.pending = pending  # True while records of this session are not durable yet
        self.taken = False  # a newer session exists: stop reading, settle, close with 4000
        self.gone = False  # the connection has ended (its records may still be pending)
        self.settled = asyncio.Event()
        self.taken_event = asyncio.Event()
        self._on_taken: Callable[[], None] | None = None

    def on_taken(self, callback: Callable[[], None]) -> None:
        """``callback`` runs (once) when a newer session takes over."""
        self._on_taken = callback
        if self.taken:
            callback()

    def take(self) -> None:
        if not self.taken:
            self.taken = True
            self.taken_event.set()
            if self._on_taken is not None:
                self._on_taken()

    async def wait_settled(self, timeout: float) -> bool:
        """Until this session (taken over, or gone) takes no more frames and every record
        it handed over is durable.  Its close (last ack, 4000) need not have gone out:
        a peer that reads nothing would hold the new session back until TCP gives up."""
        deadline = time.monotonic() + timeout
        while not self.settled.is_set():
            if (self.gone or self.taken) and not self.pending():
                self.settled.set()
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self.settled.wait(), min(left, _POLL))
            except TimeoutError:
                pass
        return True


class Sessions:
    """The sessions of this worker, and the takeover datagrams to the other workers."""

    def __init__(self, directory: Path, name: str | None = None) -> None:
        self.directory = directory
        self.local: dict[str, list[Session]] = {}
        self._sock: socket.socket | None = None
        self._path = directory / f"{name or os.getpid()}.sock"
        self._token = 0
        self._waiting: dict[int, asyncio.Future[bool]] = {}  # token -> future(newer exists)
        self._tasks: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(str(self._path))
        os.chmod(self._path, 0o600)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def stop(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self._path.unlink(missing_ok=True)
        for task in self._tasks:
            task.cancel()

    # ------------------------------------------------------------- a new session
    async def begin(self, device_id: str, pending: Callable[[], bool]) -> Session:
        """Register a new session of ``device_id`` and end every older one (here and in
        the other workers).  Returns the session (``taken`` already set if a newer one
        arrived meanwhile: the newer one waits for every older session itself);
        raises :class:`TakeoverFailed` when an older one did not settle in time."""
        session = Session(device_id, (time.monotonic_ns(), os.getpid()), pending)
        self.local.setdefault(device_id, []).append(session)
        peers = self._peers()
        if len(self.local[device_id]) == 1 and not peers:
            return session  # the only worker, the only session: nothing to take over
        work = asyncio.ensure_future(self._take_over(session, peers))
        superseded = asyncio.ensure_future(session.taken_event.wait())
        try:
            await asyncio.wait({work, superseded}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                if work.result():
                    session.take()  # a newer session was there first
            return session
        except BaseException:
            self.end(session)
            raise
        finally:
            superseded.cancel()
            if not work.done():
                work.cancel()  # superseded: the newer session waits for the older ones

    async def _take_over(self, session: Session, peers: list[Path]) -> bool:
        """End the older sessions of the device everywhere; True if a newer one exists."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        remote = await self._ask_peers(session.device_id, session.stamp, peers, deadline)
        try:
            newer = await self._take_local(session.device_id, session.stamp, deadline)
            if remote:
                done, _ = await asyncio.wait(remote, timeout=max(0.0, deadline - time.monotonic()))
                if len(done) < len(remote):
                    raise TakeoverFailed("another worker did not answer in time")
                newer = newer or any(f.result() for f in done)
            return newer
        finally:
            for future in remote:
                future.cancel()

    def end(self, session: Session) -> None:
        """The session's connection is over; it is forgotten once its records are durable."""
        session.gone = True
        if not session.pending():
            self._forget(session)
            session.settled.set()
            return
        task = asyncio.get_running_loop().create_task(self._forget_when_settled(session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forget_when_settled(self, session: Session) -> None:
        while session.pending():
            await asyncio.sleep(_POLL * 4)
        session.settled.set()
        self._forget(session)

    def _forget(self, session: Session) -> None:
        sessions = self.local.get(session.device_id)
        if sessions is not None and session in sessions:
            sessions.remove(session)
            if not sessions:
                del self.local[session.device_id]

    async def _take_local(self, device_id: str, stamp: Stamp, deadline: float) -> bool:
        """End this worker's sessions of the device older than ``stamp``; True if a newer one exists."""
        newer = False
        older = []
        for other in list(self.local.get(device_id, ())):
            if other.stamp > stamp:
                newer = True
            elif other.stamp < stamp:
                other.take()
                older.append(other)
        for other in older:
            if not await other.wait_settled(max(0.0, deadline - time.monotonic())):
                raise TakeoverFailed(f"an older session of {device_id!r} did not settle in time")
        return newer

    # ------------------------------------------------------------------- peers
    async def _ask_peers(
        self, device_id: str, stamp: Stamp, peers: list[Path], deadline: float
    ) -> list[asyncio.Future[bool]]:
        """Send TAKE to every other worker; the futures resolve to "a newer session exists"."""
        sock = self._sock
        if sock is None:
            return []
        futures = []
        loop = asyncio.get_running_loop()
        for path in peers:
            self._token += 1
            token = self._token
            future: asyncio.Future[bool] = loop.create_future()
            self._waiting[token] = future  # before sending: the answer may come at once
            future.add_done_callback(lambda f, t=token: self._waiting.pop(t, None))
            if await self._send(sock, msgpack.packb(["TAKE", token, device_id, list(stamp)]), path, deadline):
                futures.append(future)
            else:
                future.cancel()
        return futures

    @staticmethod
    async def _send(sock: socket.socket, message: bytes, path: Path, deadline: float) -> bool:
        """False if ``path`` is a dead worker's socket (removed then)."""
        pause = 0.0005
        while True:
            try:
                sock.sendto(message, str(path))
                return True
            except (ConnectionRefusedError, FileNotFoundError):
                if path.name.endswith(".sock"):
                    path.unlink(missing_ok=True)
                return False
            except BlockingIOError:
                # its queue is full (net.unix.max_dgram_qlen, 10 by default): a burst of takeovers
                if time.monotonic() + pause > deadline:
                    raise TakeoverFailed("another worker's takeover socket stayed full") from None
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.02)

    def _peers(self) -> list[Path]:
        try:
            return [p for p in self.directory.glob("*.sock") if p != self._path]
        except OSError:
            return []

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(256):
            try:
                data, sender = sock.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                message: Any = msgpack.unpackb(data)
                verb, token = message[0], message[1]
            except Exception:  # noqa: BLE001 - only our workers can write here (0600, 0700 dir)
                continue
            if verb == "TAKE" and isinstance(sender, str) and sender:
                _, _, device_id, stamp = message
                task = asyncio.get_running_loop().create_task(
                    self._answer(sender, token, str(device_id), (int(stamp[0]), int(stamp[1])))
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif verb == "DONE":
                future = self._waiting.get(token)
                if future is not None and not future.done():
                    future.set_result(bool(message[2]))

    async def _answer(self, sender: str, token: int, device_id: str, stamp: Stamp) -> None:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        try:
            newer = await self._take_local(device_id, stamp, deadline)
            sock = self._sock
            if sock is not None:
                await self._send(sock, msgpack.packb(["DONE", token, newer]), Path(sender), deadline)
        except TakeoverFailed:
            return  # no answer: the asking worker times out and refuses its connection (503)
        except OSError:
            return  # the asking worker is gone
