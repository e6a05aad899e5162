"""A resending device fleet for the namespace topology test: records every acked ``(device, seq)``.

``python -m tests.pipeline.netns_sender URL SECRET PREFIX DEVICES RATE OUT`` runs
``DEVICES`` :class:`node.client.DeviceClient` devices (ids ``PREFIX-d0`` ...), seqs
from 0, each sending ``RATE`` messages a second until SIGTERM; then it flushes (at
most ``FLUSH`` s) and exits.  Every second, and at the end, it writes ``OUT`` (JSON,
replaced atomically): ``{"acked": {device: [seq, ...]}, "next": {device: next seq},
"done": bool}``.  A seq at or above ``next`` was never handed to the client, so it
must never be stored.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from node.auth import issue_device_token
from node.client import Backoff, DeviceClient

FLUSH = 60.0  # s: longest wait for the last acks after SIGTERM
MAX_PENDING = 5000  # unacked messages per device before send() waits (back-pressure)


def write(out: Path, clients: dict[str, DeviceClient], acked: dict[str, list[int]], done: bool) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"acked": acked, "next": {d: c.next_seq for d, c in clients.items()}, "done": done})
    )
    os.replace(tmp, out)


async def run(url: str, secret: str, prefix: str, devices: int, rate: float, out: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    acked: dict[str, list[int]] = {}
    clients: dict[str, DeviceClient] = {}
    for i in range(devices):
        device = f"{prefix}-d{i}"
        acked[device] = []
        clients[device] = DeviceClient(
            url,
            issue_device_token(secret, device),
            first_seq=0,
            window=64,
            max_pending=MAX_PENDING,
            backoff=Backoff(initial=0.1, maximum=1.0),
            open_timeout=3.0,
            ping_interval=2.0,
            ping_timeout=4.0,
            on_ack=acked[device].append,
        )
    for client in clients.values():
        await client.start(wait=False)
    interval = 1.0 / rate
    next_tick = time.monotonic()
    last_write = 0.0
    while not stop.is_set():
        for client in clients.values():
            if client.pending < MAX_PENDING:  # never block the fleet on one device
                await client.send({"t": time.time()})
        next_tick += interval
        now = time.monotonic()
        if now - last_write >= 1.0:
            write(out, clients, acked, False)
            last_write = now
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, next_tick - time.monotonic()))
        except TimeoutError:
            pass
    deadline = time.monotonic() + FLUSH
    while any(c.pending for c in clients.values()) and time.monotonic() < deadline:
        write(out, clients, acked, False)
        await asyncio.sleep(0.2)
    for client in clients.values():
        await client.close(flush=False)
    write(out, clients, acked, True)


def main() -> None:
    url, secret, prefix, devices, rate, out = sys.argv[1:7]
    asyncio.run(run(url, secret, prefix, int(devices), float(rate), Path(out)))


if __name__ == "__main__":
    main()
