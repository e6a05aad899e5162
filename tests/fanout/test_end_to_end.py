"""A whole node: device -> web -> monitor -> router -> publisher -> fanout -> client app."""

from __future__ import annotations

import asyncio
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


@pytest.fixture
def node_env_running() -> Iterator[dict[str, str]]:
    path: Path = short_data_dir()
    processes = Processes()
    env = node_env(path, NODE_JWT_SECRET=SECRET, NODE_WEB_WORKERS=1)
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
