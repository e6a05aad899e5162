"""Create a private file exactly once, even when several processes start together.

Used for the generated secrets in ``NODE_DATA_DIR`` (``jwt_secret`` in
:mod:`node.auth`, CURVE keypairs in :mod:`node.curve`): the content is written to a
private temporary file (``mode``, not narrowed or widened by the umask), fsynced,
then hard-linked into place.  The link either creates ``path`` whole or fails
because another process got there first, so no reader ever sees a partial file and
concurrent first starts agree on one content (the loser reads the winner's).

:func:`private_data_dir` is what every process does first with ``NODE_DATA_DIR``:
umask 077 (everything the process creates -- the data dir, ``store.sqlite3`` and
its WAL, ring files, ipc:// sockets, metrics files -- is the owner's only), the
directory created 0700 if missing, and a warning if it exists open to others.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

__all__ = ["create_once", "private_data_dir"]

log = logging.getLogger("iotnode.files")


def create_once(path: Path, content: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` holding ``content`` unless it exists; True if this call created it
    (the directory entry is then fsynced too)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False  # another process won the race
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` durable (a new or renamed file in it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_data_dir(path: Path) -> None:
    """umask 077 for this process (and the processes it starts), ``path`` created 0700
    if missing; a warning (once per process) if it exists readable by group or others."""
    os.umask(0o077)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "NODE_DATA_DIR %s is accessible by others (mode %04o): run chmod 700 %s", path, mode, path
        )
