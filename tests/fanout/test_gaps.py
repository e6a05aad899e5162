"""A fanout that missed live messages says so: real publisher (XPUB), real fanout,
real ZeroMQ high-water-mark drops provoked by stopping the fanout (SIGSTOP)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from node.auth import issue_client_token
from node.record import pack_record
from node.ring import Ring
from tests.fanout.conftest import SECRET, TIMEOUT, private_node
from tests.support import Processes, node_env, wait_for_port, wait_until

LOSSY = "lossy"  # the device whose stream overflows while the fanout is stopped
QUIET = "quiet"  # a device with no traffic meanwhile: its client must stay open
BURST = 40_000  # ~4 MB on the wire: far beyond HWM 1 plus the ipc socket buffers


class GapNode:
    """publisher + fanout with NODE_PUB_HWM=1 (XPUB SNDHWM and the fanout's SUB RCVHWM)."""

    def __init__(self, data_dir: Path, processes: Processes) -> None:
        self.data_dir, self.processes = data_dir, processes
        self.env = node_env(data_dir, NODE_JWT_SECRET=SECRET, NODE_PUB_HWM=1, NODE_FANOUT_QUEUE=1_000_000)
        self.port = int(self.env["NODE_FANOUT_PORT"])
        for name in ("publisher", "fanout"):
            processes.start(name, f"node.workers.{name}", self.env, data_dir)
        wait_for_port(self.port)
        path = data_dir / "fanin.ring"
        wait_until(path.exists, 15, what="the publisher to create the fan-in ring")
        self.ring = Ring.open(path, capacity=int(self.env["NODE_FANIN_RING_BYTES"]), durability="process")
        self.seq = {LOSSY: 0, QUIET: 0}

    def append(self, device: str, count: int) -> None:
        first = self.seq[device]
        payloads = [pack_record(device, s, float(s), 1.7e9, {"s": s}) for s in range(first, first + count)]
        done = 0
        for _ in range(1000):  # bounded: the ring holds far more than any test appends
            done += self.ring.append_batch(payloads[done:])
            if done == len(payloads):
                break
        assert done == len(payloads)
        self.seq[device] = first + count

    def url(self, device: str) -> str:
        token = issue_client_token(SECRET, [device])
        return f"ws://127.0.0.1:{self.port}/v1/stream?device={device}&token={token}"

    def metric(self, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=TIMEOUT).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and not sample.labels:
                    return sample.value
        raise AssertionError(f"{name} not served")


@pytest.fixture
def node() -> Iterator[GapNode]:
    def release(n: GapNode) -> None:
        if n.processes.procs["fanout"].poll() is None:
            os.kill(n.processes.procs["fanout"].pid, signal.SIGCONT)
        n.ring.close()

    with private_node(GapNode, release) as n:
        yield n


async def until_live(node: GapNode, ws: Any, device: str) -> None:
    """Append one record at a time until the client receives one (its subscription is live)."""
    for _ in range(100):
        node.append(device, 1)
        try:
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 0.1))
                assert frame["device"] == device
                return
        except TimeoutError:
            pass
    raise AssertionError(f"no live record of {device} reached the client")


def test_fanout_that_missed_live_messages_closes_the_devices_clients_with_1013_naming_device_and_count(
    node: GapNode,
) -> None:
    async def scenario() -> None:
        async with (
            connect(node.url(LOSSY), open_timeout=TIMEOUT, max_queue=None) as lossy,
            connect(node.url(QUIET), open_timeout=TIMEOUT) as quiet,
        ):
            await until_live(node, lossy, LOSSY)
            await until_live(node, quiet, QUIET)
            fanout = node.processes.procs["fanout"].pid  # Processes.kill waits for an exit: not for SIGSTOP
            os.kill(fanout, signal.SIGSTOP)
            try:
                node.append(LOSSY, BURST)
                time.sleep(1.0)  # the publisher sends the burst; HWM 1 drops most of it
            finally:
                os.kill(fanout, signal.SIGCONT)
            # A gap shows at the device's next message that gets through: the burst's
            # tail was dropped, so more messages follow, one every 0.2 s (at HWM 1 one
            # sent while the fanout still drains its backlog may be dropped too).
            received = 0
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(BURST + 100):  # bounded: every message, the extra ones, then the close
                    try:
                        json.loads(await asyncio.wait_for(lossy.recv(), 0.2))
                        received += 1
                    except TimeoutError:
                        node.append(LOSSY, 1)
            assert received < BURST, "no message was lost: the test did not provoke a gap"
            rcvd = closed.value.rcvd
            assert rcvd is not None and rcvd.code == 1013, (
                closed.value,
                node.processes.log("fanout")[-3000:],
            )
            assert rcvd.reason.startswith("missed ") and rcvd.reason.endswith(
                f"live messages of device '{LOSSY}'"
            )
            missed = int(rcvd.reason.split()[1])
            assert 1 <= missed <= node.seq[LOSSY] - received
            # The other device's client is still served (once the fanout has drained the
            # lossy backlog, one message at a time: at HWM 1 a message sent while another
            # is still in the pipe is dropped, and the quiet client would see a real gap).
            await asyncio.sleep(1.0)
            for _ in range(3):
                node.append(QUIET, 1)
                frame = json.loads(await asyncio.wait_for(quiet.recv(), TIMEOUT))
                assert (frame["device"], frame["seq"]) == (QUIET, node.seq[QUIET] - 1)

    asyncio.run(asyncio.wait_for(scenario(), 90))
    assert node.metric("iotnode_fanout_gaps_total") >= 1
    assert node.metric("iotnode_fanout_gap_client_drops_total") == 1
    assert node.metric("iotnode_fanout_missed_messages_total") >= 1
    assert "messages missed" in node.processes.log("fanout")
