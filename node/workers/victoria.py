"""``victoria`` process (Procfile.storage): the VictoriaMetrics sink tailing the SQLite store.

Needs ``NODE_VM_URL`` (exit 2 naming it otherwise); see :mod:`node.storage.victoria`.
"""

from __future__ import annotations

from node.config import Settings
from node.storage.tail import TailSink
from node.workers import sinkrun


def make(settings: Settings) -> TailSink:
    from node.storage.victoria import VictoriaSink

    assert settings.vm_url is not None
    return VictoriaSink(settings.vm_url, settings.data_path / "victoria.cursor")


def main() -> None:
    sinkrun.main("victoria", "NODE_VM_URL", "vm_url", make)


if __name__ == "__main__":
    main()
