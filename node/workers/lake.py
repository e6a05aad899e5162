"""``lake`` process (Procfile.storage): the Parquet lake sink tailing the SQLite store.

Needs ``NODE_LAKE_DIR`` (exit 2 naming it otherwise); see :mod:`node.storage.lake`.
"""

from __future__ import annotations

from node.config import Settings
from node.storage.tail import TailSink
from node.workers import sinkrun


def make(settings: Settings) -> TailSink:
    from node.storage.lake import LakeSink

    assert settings.lake_dir is not None
    return LakeSink(settings.lake_dir, settings.lake_flush_rows, settings.lake_flush_seconds)


def main() -> None:
    sinkrun.main("lake", "NODE_LAKE_DIR", "lake_dir", make)


if __name__ == "__main__":
    main()
