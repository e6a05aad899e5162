"""``/metrics`` of the web front: summed over its 2 workers (multiprocess mode)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import msgpack
import pytest
import websockets

from tests.front.conftest import start_front
from tests.support import Processes

pytestmark = pytest.mark.timeout(120)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text format (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_messages_errors_refusals_and_ack_latency_over_all_workers(
    data_dir: Path, tmp_path: Path, processes: Processes
) -> None:
    prom = tmp_path / "prom"
    prom.mkdir()
    front = start_front(data_dir, tmp_path, processes, PROMETHEUS_MULTIPROC_DIR=prom)
    devices, per_device = 20, 10

    async def go() -> None:
        async def device(i: int) -> None:
            async with front.connect(f"m-{i}", ping_interval=None) as ws:
                for seq in range(per_device):
                    await ws.send(msgpack.packb({"seq": seq, "data": i}))
                last = -1
                while last < per_device - 1:
                    last = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 20))["ack"]

        await asyncio.gather(*(device(i) for i in range(devices)))
        async with front.connect("m-bad") as ws:
            await ws.send('{"seq": -1, "data": 1}')
            await ws.recv()
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(front.url, open_timeout=20):
                pass

    asyncio.run(asyncio.wait_for(go(), 60))
    total = devices * per_device
    url = f"http://127.0.0.1:{front.port}/metrics"
    text = ""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # other workers copy their counts once a second
        text = httpx.get(url, timeout=10).text
        if (
            sample(text, "iotnode_messages_total", stage="received") >= total
            and sample(text, "iotnode_errors_total", reason="bad_seq") >= 1
            and sample(text, "iotnode_errors_total", reason="auth_401") >= 1
        ):
            break
        time.sleep(0.2)
    assert sample(text, "iotnode_messages_total", stage="received") == total
    assert sample(text, "iotnode_messages_total", stage="acked") == total
    assert sample(text, "iotnode_ack_latency_seconds_count") == total
    assert 0 < sample(text, "iotnode_ack_latency_seconds_sum") < total * 20
    assert sample(text, "iotnode_errors_total", stage="web", reason="bad_seq") == 1
    assert sample(text, "iotnode_errors_total", stage="web", reason="auth_401") == 1
    counter_lines = [
        line for line in text.splitlines() if line.startswith(("iotnode_messages", "iotnode_ack"))
    ]
    assert counter_lines and not any(re.search(r'pid="\d+"', line) for line in counter_lines), (
        "counters and the histogram are summed over workers, not reported per pid"
    )
    # Each worker process writes its own files in the multiprocess directory.
    assert list(prom.glob("counter_*.db")) and list(prom.glob("histogram_*.db"))
