"""Finding 9 of issue 14: what the node writes is the owner's only.  The data dir is
created 0700 and every process runs with umask 077, so store.sqlite3 (and its WAL),
the rings, the ipc:// sockets, the metrics files and the generated secrets are not
readable by group or others; a jwt_secret file that is, is refused (test_tokens)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from tests.security.conftest import SECRET, short_dir
from tests.support import Processes, node_env, start_web, wait_until


def _open_to_others(root: Path) -> list[str]:
    found = []
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(directory) / name
            mode = stat.S_IMODE(path.lstat().st_mode)
            if mode & 0o077:
                found.append(f"{path.relative_to(root)} {mode:04o}")
    return found


def test_a_fresh_node_creates_its_data_dir_0700_and_every_file_private() -> None:
    root = short_dir("sec-modes-")
    data = root / "data"  # does not exist yet: the node creates it
    processes = Processes()
    try:
        env = node_env(data, NODE_JWT_SECRET=SECRET)
        start_web(processes, env, root)
        for stage in ("router", "publisher", "store"):
            processes.start(stage, f"node.workers.{stage}", env, root)
        wait_until(lambda: (data / "store.sqlite3").exists(), 30, what="the store's file")
        wait_until(lambda: (data / "fanin.ring").exists(), 30, what="the fan-in ring")
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert _open_to_others(data) == []
        # the generated secret too, when NODE_JWT_SECRET is not set
        env2 = node_env(root / "data2")
        env2.pop("NODE_JWT_SECRET")
        processes.start("router2", "node.workers.router", env2, root)
        wait_until(lambda: (root / "data2").exists(), 20, what="data2")
        from node.auth import load_secret
        from node.config import Settings

        os.umask(0o022)  # this test process's own umask stays permissive
        load_secret(Settings(data_dir=root / "data2"))
        assert stat.S_IMODE((root / "data2").stat().st_mode) == 0o700
        assert stat.S_IMODE((root / "data2" / "jwt_secret").stat().st_mode) == 0o600
    finally:
        processes.stop_all()
        shutil.rmtree(root, ignore_errors=True)
