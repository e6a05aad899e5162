"""The device client against a real device front (uvicorn workers, real ingress ring)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import warnings
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import jwt
import pytest

from node.auth import issue_device_token
from node.client import Backoff, ClientClosed, HandshakeRefused, MessageRejected, MessageTooLarge
from node.client import DeviceClient as _DeviceClient
from node.client.outbox import Outbox
from node.record import Record
from tests.client.conftest import PIPELINE, Node
from tests.support import ring_envelopes, wait_until

FAST = Backoff(initial=0.05, maximum=0.5)


_opened: list[_DeviceClient] = []


class DeviceClient(_DeviceClient):
    """The real client, remembered so that a failing scenario still closes it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _opened.append(self)


async def connect(
    url: str, token: str | Callable[[], str], *, timeout: float | None = None, **options: Any
) -> DeviceClient:
    client = DeviceClient(url, token, **options)
    await client.start(timeout=timeout)
    return client


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    """Run one scenario on a fresh loop, bounded in time; close its clients after."""

    async def guarded() -> Any:
        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            await asyncio.gather(*(c.close(flush=False) for c in _opened), return_exceptions=True)
            _opened.clear()

    return asyncio.run(guarded())


async def eventually(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def ring_records(node: Node) -> list[Record]:
    """Every record in the ingress ring (read with no other consumer)."""
    return ring_envelopes(
        node.env["NODE_DATA_DIR"] + "/ingress.ring", int(node.env["NODE_INGRESS_RING_BYTES"])
    )


def ring_seqs(node: Node, device: str) -> Counter[int]:
    return Counter(r.seq for r in ring_records(node) if r.device_id == device)


def stream_through_disconnects(
    node: Node, device: str, total: int
) -> tuple[list[int], Counter[int], DeviceClient]:
    """Send ``total`` messages while the front's workers are SIGKILLed and then the
    whole front is SIGKILLed and restarted; return (seqs, acks per seq, client)."""
    acks: Counter[int] = Counter()

    async def scenario() -> tuple[list[int], DeviceClient]:
        client = await connect(
            node.url, node.token(device), on_ack=lambda s: acks.update([s]), backoff=FAST, timeout=20
        )
        futures: list[asyncio.Future[int]] = []

        async def produce() -> None:
            for i in range(total):
                futures.append(await client.send({"i": i, "temp": 20.0 + i % 7}))
                if i % 20 == 0:
                    await asyncio.sleep(0.002)  # spread the stream so the kills land mid-way

        producer = asyncio.create_task(produce())
        await eventually(lambda: client.acked >= total // 8, 20, "first acks")
        killed = await asyncio.to_thread(node.kill_workers)  # uvicorn starts new workers
        assert killed >= 1
        await eventually(lambda: client.connections >= 2 and client.acked >= total // 3, 30, "reconnect")
        await asyncio.to_thread(node.kill_front)
        await asyncio.sleep(0.2)
        await asyncio.to_thread(node.start_front)
        await producer
        await client.flush(30)
        seqs = [f.result() for f in futures]
        await client.close()
        return seqs, client

    seqs, client = run(scenario(), timeout=90)
    print(f"{total} messages, {client.sent_frames} frames sent, {client.connections} connections")
    assert client.connections >= 3, "expected a reconnect after each forced disconnect"
    assert client.sent_frames > total, "expected unacked messages in flight at a kill, resent after it"
    assert len(seqs) == total
    assert seqs == list(range(seqs[0], seqs[0] + total))  # consecutive, in send order
    assert acks == Counter(seqs), "every seq acked exactly once"
    assert client.acked == total and client.pending == 0 and client.rejected == 0
    return seqs, acks, client


def test_every_message_is_acked_exactly_once_across_worker_kills_and_a_front_restart(front: Node) -> None:
    seqs, _, _ = stream_through_disconnects(front, "dev-1", 3000)
    # Ack means durable: every acked seq is in the ingress ring (resends may repeat
    # a seq there; the store deduplicates on (device_id, seq)).
    front.kill_front()
    assert set(ring_seqs(front, "dev-1")) == set(seqs)


def test_whole_node_stores_every_message_once_across_forced_disconnects(front_factory: Any) -> None:
    node: Node = front_factory(stages=PIPELINE)
    seqs, _, _ = stream_through_disconnects(node, "dev-s", 2000)
    path = Path(node.env["NODE_DATA_DIR"]) / "store.sqlite3"

    def rows() -> list[tuple[int, str]]:
        if not path.exists():
            return []
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return db.execute(
                "SELECT seq, data FROM messages WHERE device_id = 'dev-s' ORDER BY seq"
            ).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            db.close()

    try:
        wait_until(lambda: len(rows()) >= len(seqs), 60, what="every message in the store")
    except AssertionError:
        have = {seq for seq, _ in rows()}
        missing = sorted(set(seqs) - have)
        raise AssertionError(
            f"store holds {len(have)} of {len(seqs)}; missing {len(missing)}: "
            f"{[m - seqs[0] for m in missing[:20]]} (offsets)\n{node.logs()}"
        ) from None
    stored = rows()
    assert [seq for seq, _ in stored] == seqs  # each once (and nothing else)
    assert [json.loads(data)["i"] for _, data in stored] == list(range(len(seqs)))


def test_clients_dropped_together_do_not_reconnect_in_lock_step(front: Node) -> None:
    clients_n = 40
    window = 2.0  # full jitter spreads the first retry over [0, 2] s

    async def scenario() -> tuple[list[float], list[float]]:
        clients = [
            DeviceClient(
                front.url, front.token(f"fleet-{i}"), backoff=Backoff(initial=window, maximum=window)
            )
            for i in range(clients_n)
        ]
        await asyncio.gather(*(c.start(timeout=20) for c in clients))
        await asyncio.to_thread(front.kill_front)  # every connection drops at once
        dropped = time.monotonic()
        await asyncio.to_thread(front.start_front)
        await eventually(lambda: all(c.connections >= 2 for c in clients), 30, "every client back")
        # What the client decides: when it first tries again.  What the node sees:
        # when the handshakes complete (bunched a little by the workers' start-up).
        retried = [min(t for t in c.attempt_times if t > dropped) - dropped for c in clients]
        back = [c.connect_times[-1] - dropped for c in clients]
        await asyncio.gather(*(c.close() for c in clients))
        return retried, back

    retried, back = run(scenario(), timeout=60)
    slots = Counter(int(t / 0.1) for t in retried)  # first retries per 100 ms
    print(
        f"first retry after the drop: {min(retried):.2f}..{max(retried):.2f}s, busiest 100 ms slot "
        f"{max(slots.values())}/{clients_n}; back connected: {min(back):.2f}..{max(back):.2f}s"
    )
    assert max(retried) - min(retried) > 0.5 * window, (
        f"first retries within {max(retried) - min(retried):.2f}s"
    )
    assert max(retried) <= window + 1.0  # attempt 0 waits at most the initial ceiling (+ a busy loop's lag)
    # Uniform over 20 slots: ~2 per slot, 5-7 in the busiest; lock-step would put all 40 in one.
    assert max(slots.values()) <= clients_n // 4, (
        f"too many retries in one 100 ms slot: {sorted(slots.items())}"
    )
    assert max(back) - min(back) > 0.25 * window, "handshakes completed in lock-step"


def test_refused_token_is_a_distinct_error_and_is_not_retried(shared_front: Node) -> None:
    front = shared_front

    async def scenario() -> None:
        bad = issue_device_token("another-secret-0123456789-0123456789", "dev-x")
        client = DeviceClient(front.url, bad, backoff=FAST)
        with pytest.raises(HandshakeRefused) as info:
            await client.start(timeout=20)
        assert info.value.status in (401, 403)
        await asyncio.sleep(0.3)  # a retrying client would have tried again by now
        assert client.attempts == 1 and client.connections == 0
        with pytest.raises(HandshakeRefused):
            await client.send({"x": 1})

        with warnings.catch_warnings():  # PyJWT warns about the short test secret
            warnings.simplefilter("ignore")
            expired = jwt.encode(
                {"sub": "dev-x", "exp": int(time.time()) - 10}, front.secret, algorithm="HS256"
            )
        with pytest.raises(HandshakeRefused, match="HTTP 401"):
            await connect(front.url, expired, timeout=20)

    run(scenario())


def test_refusal_after_start_without_wait_fails_every_pending_future(shared_front: Node) -> None:
    front = shared_front

    async def scenario() -> None:
        client = DeviceClient(front.url, "not-a-jwt", backoff=FAST)
        await client.start(wait=False)
        fut = await client.send({"x": 1})
        with pytest.raises(HandshakeRefused):
            await fut
        with pytest.raises(HandshakeRefused):
            await client.flush(10)
        await client.close()

    run(scenario())


def test_message_over_the_node_frame_limit_is_closed_1009_and_named(front_factory: Any) -> None:
    node: Node = front_factory(NODE_MAX_MESSAGE_BYTES=1024)

    async def scenario() -> None:
        # The client does not know the node's limit (it assumes 64 KiB).
        client = await connect(node.url, node.token("dev-big"), backoff=FAST, timeout=20)
        before = [await client.send({"i": i}) for i in range(20)]
        big_seq = client.next_seq
        big = await client.send({"blob": "x" * 4000})
        after = [await client.send({"i": i}) for i in range(20)]
        with pytest.raises(MessageTooLarge) as info:
            await big
        exc = info.value
        assert exc.by_node and exc.seq == big_seq and exc.size > 4000
        assert f"seq {exc.seq}" in str(exc)
        await client.flush(20)
        assert [f.result() for f in after] == list(range(exc.seq + 1, exc.seq + 21))
        assert [f.result() for f in before] == list(range(big_seq - 20, big_seq))
        assert client.max_message_bytes < exc.size  # never sent that large again
        assert client.connections >= 2  # the rest went through after a reconnect
        await client.close()

    run(scenario())


def test_message_over_the_known_limit_is_refused_locally_without_using_a_seq(shared_front: Node) -> None:
    front = shared_front

    async def scenario() -> None:
        client = await connect(front.url, front.token("dev-l"), max_message_bytes=512, timeout=20)
        seq = client.next_seq
        with pytest.raises(MessageTooLarge, match=r"message is \d+ bytes, the limit is 512 bytes") as info:
            await client.send({"blob": "y" * 600})
        assert info.value.seq is None and info.value.size > 600
        assert client.next_seq == seq and client.pending == 0
        assert await (await client.send({"ok": True})) == seq
        await client.close()

    run(scenario())


def test_node_error_reply_fails_that_message_with_the_reason_and_it_is_not_resent(
    front_factory: Any, tmp_path: Path
) -> None:
    # A 1 MiB ingress ring takes records up to 256 KiB - 32: a 300 KB message passes
    # the 2 MiB frame limit and is refused by the node with an error reply.
    node: Node = front_factory(NODE_MAX_MESSAGE_BYTES=2 << 20, NODE_INGRESS_RING_BYTES=1 << 20)

    async def scenario() -> None:
        outbox = tmp_path / "outbox.sqlite3"
        client = await connect(
            node.url, node.token("dev-e"), max_message_bytes=2 << 20, outbox=outbox, timeout=20
        )
        ok1 = await client.send({"n": 1})
        bad_seq = client.next_seq
        bad = await client.send({"blob": "z" * 300_000})
        ok2 = await client.send({"n": 2})
        with pytest.raises(MessageRejected) as info:
            await bad
        assert info.value.seq == bad_seq
        assert info.value.reason.startswith("message too large: its record is")
        assert "the node rejected seq" in str(info.value)
        await client.flush(20)
        assert (ok1.result(), ok2.result()) == (bad_seq - 1, bad_seq + 1)
        assert client.sent_frames == 3 and client.rejected == 1 and client.connections == 1
        await client.close()
        with Outbox(outbox) as box:  # the refused message is gone: a restart will not resend it
            assert len(box) == 0 and box.next_seq == bad_seq + 2

    run(scenario())


def test_data_the_node_would_refuse_raises_before_sending(shared_front: Node) -> None:
    front = shared_front

    async def scenario() -> None:
        client = await connect(front.url, front.token("dev-p"), timeout=20)
        seq = client.next_seq
        with pytest.raises(ValueError, match="bin value"):
            await client.send({"raw": b"\x00\x01"})
        with pytest.raises(ValueError, match="non-finite"):
            await client.send(float("nan"))
        with pytest.raises(ValueError, match="ts must be a finite number"):
            await client.send(1, ts=float("inf"))
        assert client.next_seq == seq and client.sent_frames == 0
        await client.close()

    run(scenario())


def test_json_text_frames_are_acked_like_binary(shared_front: Node) -> None:
    front = shared_front

    async def scenario() -> None:
        client = await connect(front.url, front.token("dev-j"), binary=False, timeout=20)
        futs = await client.send_many([({"t": 21.5, "unit": "°C"}, 1700000000.5), ([1, 2, 3], None)])
        assert [await f for f in futs] == [client.next_seq - 2, client.next_seq - 1]
        await client.close()

    run(scenario())


def test_close_before_the_node_is_reachable_fails_pending_futures_with_client_closed(front: Node) -> None:
    async def scenario() -> None:
        front.kill_front()
        client = DeviceClient(front.url, front.token("dev-c"), backoff=FAST)
        await client.start(wait=False)
        fut = await client.send({"x": 1})
        await client.close(timeout=0.3)
        with pytest.raises(ClientClosed, match=f"before seq {client.next_seq - 1} was acked"):
            await fut
        with pytest.raises(ClientClosed):
            await client.send({"x": 2})

    run(scenario())


def test_send_waits_when_max_pending_messages_are_unacked(front: Node) -> None:
    async def scenario() -> None:
        front.kill_front()
        client = DeviceClient(front.url, front.token("dev-w"), backoff=FAST, max_pending=5, window=2)
        await client.start(wait=False)
        for i in range(5):
            await client.send(i)
        blocked = asyncio.create_task(client.send(5))
        await asyncio.sleep(0.3)
        assert not blocked.done() and client.pending == 5  # memory stays bounded
        await asyncio.to_thread(front.start_front)
        fut = await asyncio.wait_for(blocked, 20)
        await client.flush(20)
        assert fut.result() == client.next_seq - 1 and client.acked == 6
        await client.close()

    run(scenario())


def test_token_callable_is_asked_again_for_every_reconnect(front: Node) -> None:
    calls: list[float] = []

    def token() -> str:
        calls.append(time.monotonic())
        return front.token("dev-t")

    async def scenario() -> None:
        client = await connect(front.url, token, backoff=FAST, timeout=20)
        assert await (await client.send(1)) >= 0
        await asyncio.to_thread(front.kill_front)
        await asyncio.to_thread(front.start_front)
        assert await asyncio.wait_for(await client.send(2), 20) >= 0
        assert client.connections == 2 and len(calls) >= 2
        await client.close()

    run(scenario())


def test_a_callback_that_raises_does_not_stop_the_client(shared_front: Node) -> None:
    def on_ack(seq: int) -> None:
        raise RuntimeError(f"application bug on {seq}")

    async def scenario() -> None:
        client = await connect(shared_front.url, shared_front.token("dev-cb"), on_ack=on_ack, timeout=20)
        futures = [await client.send(i) for i in range(50)]
        await client.flush(20)
        assert all(f.result() >= 0 for f in futures) and client.acked == 50
        await client.close()

    run(scenario())
