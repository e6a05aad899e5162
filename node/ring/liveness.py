"""Process identity for claims: (pid, start time), robust against pid reuse.

``pid_max`` may be small (32768 here), so a pid alone is reused quickly.  A
producer is identified by its pid plus its start time in clock ticks since boot
(``/proc/PID/stat`` field 22).

A claimer is **dead** only on positive evidence: ``/proc/PID/stat`` does not exist
(``ENOENT``, or ``ESRCH`` for a process being reaped), its start time differs (the
pid was reused), or its state is Z (zombie) or X (dead).  Any other outcome -- a
permission error (``hidepid``), too many open files, an unreadable or unparsable
stat line -- means "cannot tell", which is treated as **alive**: settling a live
producer's claim would pad a record that producer is about to ack.

``/proc`` answers only for the caller's PID namespace, so the ring records the
namespace it was created in (:func:`pid_namespace`) and refuses to open from another
one (``RingNamespaceError``, see ``node/ring/ring.py``).
"""

from __future__ import annotations

import logging
import os

from node.ring.errors import RingError

log = logging.getLogger("node.ring")

PID_NAMESPACE_LINK = "/proc/self/ns/pid"


def _stat_fields(pid: int) -> list[str] | None:
    """The fields after ``comm`` of ``/proc/PID/stat``; None if that process does not exist.

    Raises OSError for any other failure (the caller decides what it means).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = raw[raw.rfind(b")") + 2 :].decode("ascii", "replace").split()
    return rest  # rest[0] is field 3 (state), rest[19] is field 22 (starttime)


def start_time(pid: int) -> int | None:
    try:
        fields = _stat_fields(pid)
    except OSError:
        return None
    if fields is None or len(fields) < 20 or not fields[19].isdigit():
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
        raise RingError(
            f"/proc/{pid}/stat is not readable: the ring needs /proc to tell live producers from dead"
        )
    return pid, token


def pid_namespace() -> int:
    """Identity of the caller's PID namespace: the inode of ``/proc/self/ns/pid``."""
    try:
        return os.stat(PID_NAMESPACE_LINK).st_ino
    except OSError as exc:
        raise RingError(
            f"{PID_NAMESPACE_LINK} is not readable ({exc.strerror}): the ring needs it to check that"
            " every process sharing a ring sees the same /proc"
        ) from exc


def is_alive(pid: int, token: int) -> bool:
    """False only if the process that made a claim with (pid, token) is positively gone."""
    try:
        fields = _stat_fields(pid)
    except OSError as exc:
        log.warning("cannot read /proc/%d/stat (%s): producer %d counted as alive", pid, exc.strerror, pid)
        return True
    if fields is None:
        return False
    if len(fields) < 20 or not fields[19].isdigit():
        log.warning("unparsable /proc/%d/stat: producer %d counted as alive", pid, pid)
        return True
    if fields[0] in ("Z", "X", "x"):
        return False
    return int(fields[19]) == token
