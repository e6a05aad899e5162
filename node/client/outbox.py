"""The device client's offline outbox: unacked messages in one SQLite file.

A message is written here (committed) before the client sends it, and deleted only
once the node has acked it, so messages survive a crash or a reboot of the device
and are resent when the node is reachable again.  The next ``seq`` is kept in the
same transaction as the message, so ``seq`` continues across restarts and the
node's ``(device_id, seq)`` deduplication keeps storage exactly-once.

Schema (version 1)::

    meta(key TEXT PRIMARY KEY, value)   'version' -> 1, 'next_seq' -> int,
                                        'device' -> str (who owns the file, or '')
    outbox(seq INTEGER PRIMARY KEY, frame BLOB NOT NULL)
        frame = the encoded protocol-v1 frame: a BLOB of MessagePack (a binary
        WebSocket frame) or TEXT holding JSON (a text frame)

Rows hold the *encoded* frame, so a resend after a restart is byte-identical to
the first send.  Pure storage: no sockets, no asyncio.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from node.errors import NodeError

__all__ = ["Outbox", "OutboxError", "SCHEMA_VERSION"]

SCHEMA_VERSION: Final = 1


class OutboxError(NodeError):
    """The outbox file cannot be used (foreign file, other version, other device)."""


class Outbox:
    """Unacked device messages, durable on disk.

    ``synchronous="FULL"`` (default) survives power loss of the device;
    ``"NORMAL"`` survives a crash of the process but may lose the last messages on
    power loss (WAL mode either way).
    """

    def __init__(
        self, path: str | Path, *, device: str = "", first_seq: int = 0, synchronous: str = "FULL"
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
        if type(first_seq) is not int or first_seq < 0:
            raise ValueError(f"first_seq must be a non-negative integer, got {first_seq!r}")
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._init_schema(device, first_seq)
        except sqlite3.DatabaseError as exc:
            raise OutboxError(f"cannot open outbox {str(self.path)!r}: {exc}") from None

    # ------------------------------------------------------------------ schema
    def _init_schema(self, device: str, first_seq: int) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)")
            db.execute("CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, frame BLOB NOT NULL)")
            version = self._meta("version")
            if version is None:
                db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("version", SCHEMA_VERSION), ("next_seq", first_seq), ("device", device)],
                )
            elif version != SCHEMA_VERSION:
                raise OutboxError(
                    f"outbox {str(self.path)!r} has schema version {version!r}, expected {SCHEMA_VERSION}"
                )
            else:
                owner = self._meta("device")
                if device and owner and owner != device:
                    raise OutboxError(
                        f"outbox {str(self.path)!r} belongs to device {owner!r}, not {device!r}"
                    )
                if device and not owner:
                    db.execute("UPDATE meta SET value = ? WHERE key = 'device'", (device,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _meta(self, key: str) -> object:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    # ------------------------------------------------------------------ state
    @property
    def next_seq(self) -> int:
        value = self._meta("next_seq")
        assert isinstance(value, int)
        return value

    @property
    def device(self) -> str:
        value = self._meta("device")
        return value if isinstance(value, str) else ""

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def pending(self) -> Iterator[tuple[int, bytes | str]]:
        """Every unacked message as ``(seq, frame)`` in ``seq`` order."""
        rows = self._db.execute("SELECT seq, frame FROM outbox ORDER BY seq").fetchall()
        for seq, frame in rows:
            yield seq, (bytes(frame) if isinstance(frame, (bytes, memoryview)) else frame)

    # ------------------------------------------------------------------ changes
    def add(self, entries: Iterable[tuple[int, bytes | str]]) -> None:
        """Store messages and advance ``next_seq`` past them, in one transaction.

        Each ``seq`` must be ``>= next_seq`` (seqs never go back, even after acks
        emptied the table).
        """
        rows = list(entries)
        if not rows:
            return
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {str(self.path)!r}: cannot store messages: {exc}") from None
        try:
            top = self.next_seq - 1
            for seq, _ in rows:
                if seq <= top:
                    raise OutboxError(f"expected a seq above {top}, got {seq}")
                top = seq
            db.executemany("INSERT INTO outbox (seq, frame) VALUES (?, ?)", rows)
            db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (top + 1,))
            db.execute("COMMIT")
        except sqlite3.Error as exc:  # disk full, I/O error
            db.execute("ROLLBACK")
            raise OutboxError(f"outbox {str(self.path)!r}: cannot store messages: {exc}") from None
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def remove_through(self, n: int) -> int:
        """Delete every message with ``seq <= n`` (a cumulative ack); returns how many."""
        try:
            return self._db.execute("DELETE FROM outbox WHERE seq <= ?", (n,)).rowcount
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {str(self.path)!r}: cannot remove acked messages: {exc}") from None

    def remove(self, seq: int) -> None:
        """Delete one message (refused by the node: it must not be resent)."""
        try:
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {str(self.path)!r}: cannot remove seq {seq}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
