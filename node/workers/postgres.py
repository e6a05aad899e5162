"""``postgres`` process (Procfile.storage): the PostgreSQL sink tailing the SQLite store.

Needs ``NODE_PG_DSN`` (exit 2 naming it otherwise); see :mod:`node.storage.postgres`.
"""

from __future__ import annotations

from node.config import Settings
from node.storage.tail import TailSink
from node.workers import sinkrun


def make(settings: Settings) -> TailSink:
    from node.storage.postgres import PostgresSink, check_dsn
    from node.storage.source import source_key

    assert settings.pg_dsn is not None
    problem = check_dsn(settings.pg_dsn)
    if problem is not None:
        sinkrun.config_exit("NODE_PG_DSN", "<hidden>", f"not a libpq connection string: {problem}")
    return PostgresSink(settings.pg_dsn, source_key(settings.store_path))


def main() -> None:
    sinkrun.main("postgres", "NODE_PG_DSN", "pg_dsn", make)


if __name__ == "__main__":
    main()
