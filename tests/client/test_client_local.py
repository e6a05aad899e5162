"""Client behaviour that needs no node: option checks, start-up, seq numbering."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from node.client import Backoff, ClientClosed, DeviceClient, connect
from node.client.outbox import Outbox, OutboxError
from tests.support import free_port

FAST = Backoff(initial=0.05, maximum=0.2)


def nowhere() -> str:
    """A loopback URL where nothing listens."""
    return f"ws://127.0.0.1:{free_port()}/v1/ingest"


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"url": "http://x/"}, "expected a ws:// or wss:// URL, got 'http://x/'"),
        ({"token": ""}, "expected a non-empty token string"),
        ({"window": 0}, "window must be an integer >= 1, got 0"),
        ({"max_pending": 2.5}, "max_pending must be an integer >= 1, got 2.5"),
        ({"max_message_bytes": 8}, "max_message_bytes must be an integer >= 16, got 8"),
        ({"first_seq": -1}, "first_seq must be a non-negative integer, got -1"),
    ],
)
def test_bad_client_options_raise_value_error_naming_the_value(kwargs: dict[str, object], text: str) -> None:
    args: dict[str, object] = {"url": "ws://127.0.0.1:1/v1/ingest", "token": "t"} | kwargs
    url, token = args.pop("url"), args.pop("token")
    with pytest.raises(ValueError) as info:
        DeviceClient(url, token, **args)  # type: ignore[arg-type]
    assert text in str(info.value)


def test_send_before_start_is_a_clear_error() -> None:
    async def scenario() -> None:
        client = DeviceClient(nowhere(), "t")
        with pytest.raises(RuntimeError, match="start"):
            await client.send(1)

    asyncio.run(scenario())


def test_start_gives_up_after_its_timeout_naming_the_url_and_keeps_retrying_until_then() -> None:
    async def scenario() -> None:
        url = nowhere()
        client = DeviceClient(url, "t", backoff=FAST)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=f"no connection to {url} within 0.6 s"):
            await client.start(timeout=0.6)
        assert 0.5 < time.monotonic() - started < 5
        assert client.attempts >= 3 and client.connections == 0
        with pytest.raises(ClientClosed):
            await client.send(1)

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_restarted_client_without_outbox_numbers_above_its_previous_run() -> None:
    # Without an outbox the first seq comes from the clock (microseconds): a device
    # restarted a moment later never reuses a seq the node may have stored.
    async def one_run() -> tuple[int, int]:
        client = await connect(nowhere(), "t", wait=False, backoff=FAST)
        futures = [await client.send(i) for i in range(100)]
        last = client.next_seq - 1
        await client.close(flush=False)
        assert all(isinstance(f.exception(), ClientClosed) for f in futures)
        return last - 99, last

    first_a, last_a = asyncio.run(one_run())
    first_b, _ = asyncio.run(one_run())
    assert first_a > 1_700_000_000 * 10**6  # microseconds since the epoch
    assert first_b > last_a


def test_offline_client_keeps_messages_in_its_outbox_and_continues_the_seq(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"

    async def offline_run(n: int) -> list[int]:
        client = await connect(
            nowhere(), "t", wait=False, outbox=path, device="dev-1", first_seq=7, backoff=FAST
        )
        start = client.next_seq
        futures = await client.send_many([({"i": i}, None) for i in range(n)])
        assert len(futures) == n
        await client.close(flush=False)
        return list(range(start, client.next_seq))

    assert asyncio.run(offline_run(3)) == [7, 8, 9]
    assert asyncio.run(offline_run(2)) == [10, 11]  # first_seq only applies to a new outbox
    with Outbox(path) as box:
        assert [seq for seq, _ in box.pending()] == [7, 8, 9, 10, 11]
        assert box.device == "dev-1"

    async def other_device() -> None:
        await connect(nowhere(), "t", wait=False, outbox=path, device="dev-2")

    with pytest.raises(OutboxError, match="belongs to device 'dev-1', not 'dev-2'"):
        asyncio.run(other_device())


def test_close_does_not_wait_out_a_handshake_that_hangs() -> None:
    # A loopback listener that never answers: the TCP connect succeeds, the
    # WebSocket handshake would wait for open_timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"ws://127.0.0.1:{silent.getsockname()[1]}/v1/ingest"

        async def scenario() -> float:
            client = await connect(url, "t", wait=False, open_timeout=30)
            fut = await client.send(1)
            await asyncio.sleep(0.3)
            assert client.attempts == 1 and client.connections == 0
            started = time.monotonic()
            await client.close(flush=False)
            assert isinstance(fut.exception(), ClientClosed)
            return time.monotonic() - started

        assert asyncio.run(asyncio.wait_for(scenario(), 20)) < 2.0
