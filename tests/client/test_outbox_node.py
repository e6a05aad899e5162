"""The CLI device with an outbox against a whole node (front + pipeline + store)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.client.conftest import PIPELINE, Node
from tests.support import REPO, wait_until


def client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return env


def start_client(node: Node, outbox: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    args = [
        "--url", node.url, "--token", node.token("dev-o"), "--device", "dev-o", "--outbox", str(outbox),
        "--print-acks", "--backoff-initial", "0.05", "--backoff-max", "0.5", "--timeout", "30", *extra,
    ]  # fmt: skip
    with open(out, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "node.client", *args],
            stdin=subprocess.PIPE, stdout=fh, stderr=fh, env=client_env(), cwd=str(REPO),
            start_new_session=True,
        )  # fmt: skip


def feed(proc: subprocess.Popen[bytes], first: int, count: int) -> None:
    assert proc.stdin is not None
    proc.stdin.write(
        "".join(json.dumps({"i": i, "temp": 20 + i % 5}) + "\n" for i in range(first, first + count)).encode()
    )
    proc.stdin.flush()


def acks_in(out: Path) -> int:
    return sum(1 for line in out.read_text().splitlines() if line.startswith('{"line"') and '"ack"' in line)


def outbox_rows(outbox: Path) -> int:
    db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    except sqlite3.OperationalError:
        return -1
    finally:
        db.close()


def stored(node: Node) -> list[tuple[int, Any]]:
    path = Path(node.env["NODE_DATA_DIR"]) / "store.sqlite3"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT seq, data FROM messages WHERE device_id = 'dev-o' ORDER BY seq").fetchall()
    except sqlite3.OperationalError:  # the store has not created its table yet
        return []
    finally:
        db.close()
    return [(seq, json.loads(data)) for seq, data in rows]


def test_killed_client_resends_its_outbox_and_the_store_keeps_every_message_once(
    front_factory: Any, tmp_path: Path
) -> None:
    node: Node = front_factory(stages=PIPELINE)
    outbox = tmp_path / "device" / "outbox.sqlite3"
    outbox.parent.mkdir()
    out = tmp_path / "client.out"
    try:
        # 1. Node up: 100 messages acked (and removed from the outbox).
        proc = start_client(node, outbox, out)
        feed(proc, 0, 100)
        wait_until(lambda: acks_in(out) >= 100, 30, what="100 acks")
        # 2. Node's front gone: 150 more are accepted into the outbox, unacked.
        node.kill_front()
        feed(proc, 100, 150)
        wait_until(lambda: outbox_rows(outbox) == 150, 30, what="150 unacked messages in the outbox")
        # 3. The device dies (SIGKILL) with them unacked.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(15)
        proc.stdin.close()  # type: ignore[union-attr]
        assert outbox_rows(outbox) == 150
        # 4. Node back, device restarted: the outbox is resent, 50 new ones follow.
        node.start_front()
        proc = start_client(node, outbox, out)
        feed(proc, 250, 50)
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(60) == 0, out.read_text()[-3000:]
        summary = json.loads(out.read_text().strip().splitlines()[-1])
        assert summary["acked"] == 200 and summary["unacked"] == 0  # 150 resent + 50 new
        assert outbox_rows(outbox) == 0
        # 5. The store holds every message exactly once, seqs in send order.
        wait_until(lambda: len(stored(node)) >= 300, 60, what="300 rows in the store")
        rows = stored(node)
        assert [data["i"] for _, data in rows] == list(range(300)), node.logs()
        seqs = [seq for seq, _ in rows]
        assert seqs == list(range(seqs[0], seqs[0] + 300))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()
