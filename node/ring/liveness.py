"""Process identity for claims: (pid, start time), robust against pid reuse.

``pid_max`` may be small (32768 here), so a pid alone is reused quickly.  A
producer is identified by its pid plus its start time in clock ticks since boot
(``/proc/PID/stat`` field 22).  A process is alive if ``/proc/PID/stat`` exists,
its start time matches and its state is not Z (zombie) or X (dead).
"""

from __future__ import annotations

import os

from node.ring.errors import RingError


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = raw[raw.rfind(b")") + 2 :].decode("ascii", "replace").split()
    return rest  # rest[0] is field 3 (state), rest[19] is field 22 (starttime)


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])


def identity() -> tuple[int, int]:
    """(pid, start-time token) of the calling process.

    Without a readable ``/proc/self/stat`` liveness cannot be decided, and a live
    producer's claim could be settled as dead: refuse to run instead.
    """
    pid = os.getpid()
    token = start_time(pid)
    if token is None:
        raise RingError(f"/proc/{pid}/stat is not readable: the ring needs /proc to tell live producers from dead")
    return pid, token


def is_alive(pid: int, token: int) -> bool:
    """True if the process that made a claim with (pid, token) still runs."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return False
    if fields[0] in ("Z", "X", "x"):
        return False
    return int(fields[19]) == token
