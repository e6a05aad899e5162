"""A whole node: device -> web -> monitor -> router -> publisher -> fanout -> client app."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from node.auth import issue_client_token, issue_device_token
from tests.fanout.conftest import SECRET, TIMEOUT, keys, nothing_more, receive, short_data_dir, unique
from tests.support import Processes, node_env, wait_for_port

STAGES = ("monitor", "router", "publisher", "store", "fanout", "web")


@contextlib.contextmanager
def running_node(**overrides: object) -> Iterator[dict[str, str]]:
    """Every stage as its own process (one web worker); yields the node's environment."""
    path: Path = short_data_dir()
    processes = Processes()
    env = node_env(path, NODE_JWT_SECRET=SECRET, NODE_WEB_WORKERS=1, **overrides)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(path / "metrics-web")  # as the Procfile does for web
    (path / "metrics-web").mkdir()
    try:
        for stage in STAGES:
            processes.start(stage, f"node.workers.{stage}", env, path)
        for var in ("NODE_FANOUT_PORT", "NODE_WEB_PORT"):
            try:
                wait_for_port(int(env[var]), timeout=30)
            except AssertionError:
                raise AssertionError(
                    "\n".join(f"--- {n}\n{processes.log(n)[-1500:]}" for n in STAGES)
                ) from None
        yield env
    finally:
        processes.stop_all()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def node_env_running() -> Iterator[dict[str, str]]:
    with running_node() as env:
        yield env


def test_device_messages_reach_a_client_app_in_order_with_their_values(
    node_env_running: dict[str, str],
) -> None:
    env = node_env_running
    device = unique("e2e")
    count = 60

    async def scenario() -> None:
        client_url = (
            f"ws://127.0.0.1:{env['NODE_FANOUT_PORT']}/v1/stream?device={device}"
            f"&token={issue_client_token(SECRET, [device])}"
        )
        device_url = f"ws://127.0.0.1:{env['NODE_WEB_PORT']}/v1/ingest"
        headers = {"Authorization": f"Bearer {issue_device_token(SECRET, device)}"}
        async with (
            connect(client_url, open_timeout=TIMEOUT, compression=None) as app,
            connect(device_url, additional_headers=headers, open_timeout=TIMEOUT) as dev,
        ):
            # Probe until the subscription has reached the publisher (it is forwarded
            # asynchronously): send seq 0, 1, ... until the app sees one of them.
            sent_at = time.time()
            seq = 0
            first = None
            for _ in range(100):
                await dev.send(json.dumps({"seq": seq, "ts": 100.0 + seq, "data": {"v": seq, "s": "é"}}))
                seq += 1
                try:
                    first = json.loads(await asyncio.wait_for(app.recv(), 0.1))
                    break
                except TimeoutError:
                    continue
            assert first is not None, "the client app never received a message"
            start = first["seq"]
            for later in range(seq, start + count):
                message = {"seq": later, "ts": 100.0 + later, "data": {"v": later, "s": "é"}}
                await dev.send(json.dumps(message))
            acked = -1
            for _ in range(start + count):
                if acked == start + count - 1:
                    break
                acked = json.loads(await asyncio.wait_for(dev.recv(), TIMEOUT))["ack"]
            assert acked == start + count - 1
            frames = [first] + await receive(app, count - 1, timeout=20)
            await nothing_more(app)
        assert keys(frames) == [(device, s) for s in range(start, start + count)]
        for f in frames:
            assert f["ts"] == 100.0 + f["seq"] and f["data"] == {"v": f["seq"], "s": "é"}
            assert sent_at - 1 <= f["received_at"] <= time.time() + 1

    asyncio.run(asyncio.wait_for(scenario(), 90))


#: A coalescing delay far above what one pass through the pipeline takes, even on a
#: loaded machine: a lone message waited it in the monitor and in the publisher (2 x).
LONG_COALESCE_MS = 400


def test_a_lone_message_reaches_the_client_app_without_waiting_for_the_coalescing_delay() -> None:
    """Coalescing applies only under load (node/pipeline/doorbell.py): after a quiet
    spell a message goes through the monitor and the publisher at once, so it reaches
    the client app well within one coalescing delay (it used to wait two)."""
    device = unique("lone")

    async def scenario(env: dict[str, str]) -> list[float]:
        client_url = (
            f"ws://127.0.0.1:{env['NODE_FANOUT_PORT']}/v1/stream?device={device}"
            f"&token={issue_client_token(SECRET, [device])}"
        )
        device_url = f"ws://127.0.0.1:{env['NODE_WEB_PORT']}/v1/ingest"
        headers = {"Authorization": f"Bearer {issue_device_token(SECRET, device)}"}
        async with (
            connect(client_url, open_timeout=TIMEOUT, compression=None) as app,
            connect(device_url, additional_headers=headers, open_timeout=TIMEOUT) as dev,
        ):
            seq = 0
            for _ in range(100):  # until the subscription has reached the publisher
                await dev.send(json.dumps({"seq": seq, "data": seq}))
                seq += 1
                try:
                    await asyncio.wait_for(app.recv(), 0.5)
                    break
                except TimeoutError:
                    continue
            else:
                raise AssertionError("the client app never received a message")
            await nothing_more(app, 2 * LONG_COALESCE_MS / 1000 + 0.5)  # what the probes left behind
            took = []
            for _ in range(3):
                await asyncio.sleep(2 * LONG_COALESCE_MS / 1000)  # quiet: no poke within the delay
                sent = time.monotonic()
                await dev.send(json.dumps({"seq": seq, "data": seq}))
                frame = json.loads(await asyncio.wait_for(app.recv(), TIMEOUT))
                took.append(time.monotonic() - sent)
                assert frame["seq"] == seq
                seq += 1
            return took

    with running_node(NODE_PIPELINE_COALESCE_MS=LONG_COALESCE_MS) as env:
        took = asyncio.run(asyncio.wait_for(scenario(env), 90))
    # Before: >= 2 x 400 ms each (monitor and publisher waited the delay).  Now one
    # pass through every stage: milliseconds; the bound leaves room for a loaded machine.
    assert max(took) < LONG_COALESCE_MS / 1000, f"lone messages took {took} s"
