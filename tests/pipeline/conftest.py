"""Pipeline test helpers: the test process plays the ring producer or consumer itself.

``IngressProducer`` appends record envelopes to a real ingress ring file (as the
web front would); ``FaninConsumer`` is the fan-in ring's single consumer (as the
publisher would).  Stages run as real processes via ``tests.support.Processes``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node.record import pack_record, unpack_record
from node.ring import Ring
from tests.support import Processes, node_env, wait_until

INGRESS_BYTES = 4 << 20  # node_env's NODE_INGRESS_RING_BYTES
FANIN_BYTES = 8 << 20  # node_env's NODE_FANIN_RING_BYTES


class IngressProducer:
    """Appends ``(device, seq)`` envelopes to an ingress ring, waiting (bounded) when it is full."""

    def __init__(
        self, path: Path, capacity: int = INGRESS_BYTES, devices: int = 10, pad: int = 0, prefix: str = "dev"
    ) -> None:
        self.ring = Ring.open(path, capacity=capacity, durability="process")
        self.devices = [f"{prefix}{i}" for i in range(devices)]
        self.next_seq = {d: 0 for d in self.devices}
        self.pad = "x" * pad
        self.sent: list[tuple[str, int]] = []

    def append(self, count: int, timeout: float = 20.0) -> None:
        batch: list[bytes] = []
        keys: list[tuple[str, int]] = []
        for i in range(count):
            dev = self.devices[(len(self.sent) + i) % len(self.devices)]
            seq = self.next_seq[dev]
            self.next_seq[dev] = seq + 1
            batch.append(pack_record(dev, seq, None, time.time(), {"seq": seq, "pad": self.pad}))
            keys.append((dev, seq))
        done = 0
        deadline = time.monotonic() + timeout
        while done < len(batch):
            n = self.ring.append_batch(batch[done:])
            done += n
            self.sent.extend(keys[done - n : done])
            if done < len(batch):
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"ingress ring stayed full for {timeout}s ({done}/{len(batch)} appended)"
                    )
                time.sleep(0.005)

    def close(self) -> None:
        self.ring.close()


class FaninConsumer:
    """The fan-in ring's single consumer: collects ``(device, seq)`` in ring order."""

    def __init__(self, path: Path, capacity: int = FANIN_BYTES) -> None:
        self.ring = Ring.open(path, capacity=capacity, durability="process")
        self.reader = self.ring.reader()
        self.pos = self.ring.head
        self.got: list[tuple[str, int]] = []

    def drain(self, pop: bool = True) -> int:
        n = 0
        for _ in range(1000):
            # A pop releases the wrap padding after it too once the reader has scanned
            # it (it stops at the record claimed after the padding): go on from the head.
            self.pos = max(self.pos, self.ring.head)
            recs = self.reader.read(self.pos, max_records=4096, max_bytes=8 << 20)
            if not recs:
                break
            for r in recs:
                env = unpack_record(r.payload)
                self.got.append((env.device_id, env.seq))
            n += len(recs)
            self.pos = recs[-1].end
            if pop:
                self.reader.pop(self.pos)
        return n

    def distinct(self) -> int:
        return len(set(self.got))

    def until_distinct(self, count: int, timeout: float = 30.0) -> None:
        def enough() -> bool:
            self.drain()
            return self.distinct() >= count

        wait_until(enough, timeout, interval=0.01, what=f"{count} distinct records in the fan-in ring")

    def close(self) -> None:
        self.reader.close()
        self.ring.close()


def check_delivery(sent: list[tuple[str, int]], got: list[tuple[str, int]]) -> int:
    """Every sent record arrived, first arrivals keep per-device order; return duplicates."""
    assert set(got) == set(sent), (
        f"missing {sorted(set(sent) - set(got))[:10]}, extra {sorted(set(got) - set(sent))[:10]}"
    )
    seen: set[tuple[str, int]] = set()
    last: dict[str, int] = {}
    for dev, seq in got:
        if (dev, seq) in seen:
            continue
        seen.add((dev, seq))
        assert seq == last.get(dev, -1) + 1, f"{dev}: seq {seq} first arrived after {last.get(dev)}"
        last[dev] = seq
    return len(got) - len(seen)


class Stages:
    """Starts/stops monitor and router processes of one data dir."""

    def __init__(self, processes: Processes, data_dir: Path, log_dir: Path, **env: object) -> None:
        self.processes = processes
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.env = node_env(data_dir, **env)
        self.ingress_path = data_dir / "ingress.ring"
        self.fanin_path = data_dir / "fanin.ring"

    def start(self, name: str, tag: str = "") -> None:
        self.processes.start(name + tag, f"node.workers.{name}", self.env, self.log_dir)

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.processes.log(n)[-3000:]}" for n in self.processes.procs)


@pytest.fixture
def stages(processes: Processes, data_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Stages]]:
    def make(data: Path | None = None, **env: object) -> Stages:
        d = data or data_dir
        d.mkdir(parents=True, exist_ok=True)
        return Stages(processes, d, tmp_path, **env)

    yield make
