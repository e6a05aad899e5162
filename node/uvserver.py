"""uvicorn, run without its timer ticks: an idle web worker or fanout sleeps (issue 16).

uvicorn's ``Server.main_loop`` wakes its event loop every 0.1 s, only to see whether
``should_exit`` was set and, once a second, to re-render the ``Date`` header; its
``Multiprocess`` supervisor pings each worker over a pipe every 0.5 s (a wake of the
supervisor and of a pong thread in every worker).  On an idle node those ticks were
most of the web workers' and the fanout's CPU.  Here:

* :class:`Server` -- ``main_loop`` waits for an event that setting ``should_exit``
  sets (uvicorn's signal handler ``handle_exit`` sets it; so can a test or an
  embedding thread): SIGTERM still starts the graceful shutdown at once (uvloop
  and asyncio wake on a signal through their wakeup fd).  The ``Date`` header is
  computed when a response asks for the default headers, once per second at most
  (:class:`LazyHeaders`), not on a timer.  With ``limit_max_requests`` (not used
  by the node) the request count must be checked: uvicorn's own loop runs then.
* :class:`Supervisor` -- the web front's ``Multiprocess`` whose workers run
  :class:`Server`; it sleeps until a signal arrives (SIGTERM/SIGINT/SIGHUP/
  SIGTTIN/SIGTTOU as in uvicorn, and SIGCHLD: a worker that died is restarted at
  once) or :data:`HEALTHCHECK_INTERVAL` passed, then pings the workers as uvicorn
  does (a hung worker, alive but not answering within
  ``timeout_worker_healthcheck``, is killed and replaced).
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
import time
from email.utils import formatdate
from types import FrameType

import uvicorn
from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.server import ServerState
from uvicorn.supervisors.multiprocess import Multiprocess, Process

__all__ = ["HEALTHCHECK_INTERVAL", "LazyHeaders", "Server", "Supervisor"]

log = logging.getLogger("uvicorn.error")

#: s between the supervisor's liveness pings of its workers (uvicorn: 0.5 s).  A dead
#: worker is noticed at once (SIGCHLD); this bounds only how long a *hung* one (alive,
#: not answering the ping within timeout_worker_healthcheck) serves nobody.
HEALTHCHECK_INTERVAL = 5.0


class LazyHeaders(ServerState):
    """uvicorn's shared server state whose ``default_headers`` (``Date`` + the configured
    headers) are rendered when read, at most once per wall-clock second."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._second = -1
        self._extra: list[tuple[bytes, bytes]] | None = None  # the config's headers rendered with it
        self._headers: list[tuple[bytes, bytes]] = []
        super().__init__()

    @property
    def default_headers(self) -> list[tuple[bytes, bytes]]:
        config = self._config
        extra = config.encoded_headers  # set by config.load()
        if not config.date_header:
            return extra
        now = time.time()
        second = int(now)
        if second != self._second or extra is not self._extra:
            self._second, self._extra = second, extra
            self._headers = [(b"date", formatdate(now, usegmt=True).encode()), *extra]
        return self._headers

    @default_headers.setter
    def default_headers(self, value: list[tuple[bytes, bytes]]) -> None:
        pass  # ServerState.__init__ sets [], uvicorn's on_tick its render: computed above instead


class Server(uvicorn.Server):
    """A uvicorn server whose main loop sleeps until it should exit (module docstring)."""

    def __init__(self, config: Config) -> None:
        self._exit_wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        super().__init__(config)
        self.server_state = LazyHeaders(config)

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._exit_wake is not None:
            loop, event = self._exit_wake
            try:
                loop.call_soon_threadsafe(event.set)  # from the signal handler or another thread
            except RuntimeError:
                pass  # the loop is closed: nothing waits any more

    async def main_loop(self) -> None:
        if self.limit_max_requests is not None:
            await super().main_loop()  # the request count is polled there
            return
        event = asyncio.Event()
        self._exit_wake = (asyncio.get_running_loop(), event)
        try:
            if self.config.callback_notify is not None:
                await self._notify_until_exit(event)
            else:
                while not self.should_exit:
                    await event.wait()
        finally:
            self._exit_wake = None

    async def _notify_until_exit(self, event: asyncio.Event) -> None:
        """uvicorn's ``callback_notify`` every ``timeout_notify`` s (gunicorn's worker
        heartbeat; the node does not use it), until exit."""
        assert self.config.callback_notify is not None
        while not self.should_exit:
            await self.config.callback_notify()
            try:
                await asyncio.wait_for(event.wait(), self.config.timeout_notify)
            except TimeoutError:
                pass


class QuietProcess(Process):
    """A uvicorn worker process that serves with :class:`Server`."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = Server(config=self.config)
        return self._server


class Supervisor(Multiprocess):
    """uvicorn's ``Multiprocess`` that sleeps between events (module docstring)."""

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)  # installs handlers queueing SIGNALS
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # The interpreter writes to this fd when any handled signal arrives (the handler
        # itself runs later, between bytecodes): the select below returns at once.
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, self._on_child)

    def _on_child(self, sig: int, frame: FrameType | None) -> None:
        return None  # only wakes the loop (the wakeup fd): keep_subprocess_alive() looks

    def _spawn(self) -> Process:
        process = QuietProcess(self.config, self.sockets)
        process.start()
        return process

    def _sleep(self, timeout: float) -> None:
        try:
            select.select([self._wake_r], [], [], timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries select itself
            pass
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            self.processes.append(self._spawn())

    def run(self) -> None:
        log.info("Started parent process [%d]", os.getpid())
        self.init_processes()
        try:
            while not self.should_exit.is_set():
                self._sleep(HEALTHCHECK_INTERVAL)
                self.handle_signals()
                self.keep_subprocess_alive()
            self.terminate_all()
            self.join_all()
        finally:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
        log.info("Stopping parent process [%d]", os.getpid())

    def keep_subprocess_alive(self) -> None:
        """uvicorn's, with replacements that are :class:`QuietProcess` too."""
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung (or dead): make sure, then reap it
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                # It failed before serving (app, socket): every restart would fail the same way.
                log.error("Child process [%s] failed to start, stopping the parent process.", process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.info("Child process [%s] died", process.pid)
            self.processes[idx] = self._spawn()

    def restart_all(self) -> None:
        """SIGHUP: replace each worker, the new one serving before the old one stops (as uvicorn)."""
        for idx, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._spawn()
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                if not self.should_exit.is_set():
                    log.error(
                        "New child process [%s] was not ready in time; keeping worker [%s]"
                        " and aborting the restart.",
                        new.pid,
                        old.pid,
                    )
                return
            old.terminate()
            old.join()
            self.processes[idx] = new

    def handle_ttin(self) -> None:
        log.info("Received SIGTTIN, increasing the number of processes.")
        self.processes_num += 1
        self.processes.append(self._spawn())
