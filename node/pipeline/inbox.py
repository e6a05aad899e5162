"""Taking what a stage's sockets have queued, without blocking: one loop for every stage;
and the stop signal's fd in a stage's poller.

A stage's poll loop wakes when a socket is readable, then handles a bounded number
of queued messages (a budget, so one busy peer cannot starve the rest of the loop).
A malformed message (:class:`node.wire.WireError`) is logged, counted as
``iotnode_errors_total{stage, reason="wire"}`` and dropped: it never stops the stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from node import wire
from node.metrics import ERRORS

_NOBLOCK = int(zmq.NOBLOCK)


def take_queued(
    sock: zmq.Socket[bytes],
    budget: int,
    handle: Callable[[Any], object],
    *,
    stage: str,
    what: str,
    log: logging.Logger,
    multipart: bool = True,
    full: Callable[[], bool] | None = None,
) -> bool:
    """Hand up to ``budget`` queued messages of ``sock`` to ``handle`` (frames, or one
    frame with ``multipart=False``); stop early once ``full()`` is true.

    Returns False once the socket had nothing more queued, True if it may have more.
    """
    for _ in range(budget):
        if full is not None and full():
            return True
        try:
            message = sock.recv_multipart(_NOBLOCK) if multipart else sock.recv(_NOBLOCK)
        except zmq.Again:
            return False
        try:
            handle(message)
        except wire.WireError as exc:
            log.warning("dropped a malformed %s message: %s", what, exc)
            ERRORS.labels(stage=stage, reason="wire").inc()
    return True


def register_stop(poller: zmq.Poller, stop: object) -> bool:
    """Register the fd of ``stop`` (a :class:`node.workers.runtime.Stop`, readable once
    SIGTERM/SIGINT arrived) in ``poller``, so a long idle poll returns at the signal.
    Returns False for a plain ``threading.Event`` (tests): poll on a short timeout then."""
    fd = getattr(stop, "fd", None)
    if not isinstance(fd, int):
        return False
    poller.register(fd, zmq.POLLIN)
    return True


def socket_events(monitor: zmq.Socket[bytes]) -> Iterator[dict[str, Any]]:
    """The events queued on a socket monitor (``sock.get_monitor_socket()``), without blocking."""
    while True:
        try:
            yield recv_monitor_message(monitor, _NOBLOCK)
        except zmq.Again:
            return
