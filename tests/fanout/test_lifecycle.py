"""The fanout process: clean stop on SIGTERM, loud refusal of bad configuration."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from node import wire
from tests.fanout.conftest import SECRET, TIMEOUT, FanoutNode, receive, unique
from tests.support import Processes, node_env, run_module, wait_for_port


def run_fanout(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_module("node.workers.fanout", env=env)


def test_sigterm_closes_streams_and_exits_zero(private_dir: Path) -> None:
    processes = Processes()
    node = FanoutNode(processes, private_dir)
    device = unique("term")
    try:

        async def scenario() -> int:
            async with node.connect([device]) as ws:
                node.publisher.wait_subscribed(device)
                node.publisher.publish(device, 1)
                await receive(ws, 1)
                node.proc.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), TIMEOUT)
                assert closed.value.rcvd is not None and closed.value.rcvd.code in (1001, 1012)
            return await asyncio.to_thread(node.proc.wait, TIMEOUT)

        assert asyncio.run(scenario()) == 0, processes.log(node.name)
        assert "Traceback" not in processes.log(node.name)
    finally:
        node.close()
        processes.stop_all()


def test_idle_fanout_exits_zero_on_sigterm(private_dir: Path) -> None:
    processes = Processes()
    node = FanoutNode(processes, private_dir)
    try:
        assert node.stop(signal.SIGTERM) == 0
    finally:
        node.close()
        processes.stop_all()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("NODE_FANOUT_QUEUE", "0"),
        ("NODE_FANOUT_PORT", "http"),
        ("NODE_PUB_BIND", "udp://x:1"),
        ("NODE_PUB_HWM", "-1"),
    ],
)
def test_bad_configuration_exits_nonzero_naming_the_variable(
    private_dir: Path, variable: str, value: str
) -> None:
    result = run_fanout(node_env(private_dir, NODE_JWT_SECRET=SECRET, **{variable: value}))
    assert result.returncode == 2
    assert variable in result.stderr and value in result.stderr


def test_busy_port_exits_nonzero_naming_the_variable(private_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_fanout(node_env(private_dir, NODE_JWT_SECRET=SECRET, NODE_FANOUT_PORT=port))
    assert result.returncode == 2
    assert f"NODE_FANOUT_PORT={port}" in result.stderr


def test_query_token_never_reaches_the_log(private_dir: Path) -> None:
    processes = Processes()
    node = FanoutNode(processes, private_dir)
    token = node.token(["a"])
    try:

        async def scenario() -> None:
            async with node.connect(["a"], token=token):
                pass
            with pytest.raises(InvalidStatus):  # a refusal: uvicorn's spurious error line is filtered
                async with node.connect(["b"], token=token):
                    pass

        asyncio.run(scenario())
        assert node.stop() == 0
        log = processes.log(node.name)
        assert "token=<redacted>" in log
        assert token not in log and token.split(".")[2] not in log
        assert "without completing handshake" not in log
    finally:
        node.close()
        processes.stop_all()


def test_sigkilled_fanout_restarts_on_the_same_port_and_streams_again(private_dir: Path) -> None:
    processes = Processes()
    node = FanoutNode(processes, private_dir)
    device = unique("again")
    try:

        async def first() -> None:
            async with node.connect([device]) as ws:
                node.publisher.wait_subscribed(device)
                node.publisher.publish(device, 1)
                await receive(ws, 1)
                processes.kill(node.name, signal.SIGKILL)
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), TIMEOUT)

        asyncio.run(first())
        node.proc = processes.start(node.name, "node.workers.fanout", node.env, private_dir)
        wait_for_port(node.port)

        async def second() -> None:
            async with node.connect([device]) as ws:
                node.publisher.wait_event(
                    b"\x01" + wire.device_topic(device), after=len(node.publisher.events)
                )
                node.publisher.publish(device, 2)
                assert [f["seq"] for f in await receive(ws, 1)] == [2]

        asyncio.run(second())
    finally:
        node.close()
        processes.stop_all()
