"""The client-app stream against a real fanout process, the test playing the publisher."""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from node import wire
from node.auth import issue_device_token
from node.record import pack_record
from tests.fanout.conftest import RING_ID, SECRET, FanoutNode, keys, nothing_more, receive, unique


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


async def refused_status(node: FanoutNode, url: str, **kwargs: object) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, open_timeout=10, **kwargs):  # type: ignore[arg-type]
            pass
    response = info.value.response
    return response.status_code, bytes(response.body or b"").decode()


# ------------------------------------------------------------------ who sees what
def test_client_sees_only_its_devices_in_per_device_order(fanout: FanoutNode) -> None:
    a, b, other = unique("a"), unique("b"), unique("other")

    async def scenario() -> None:
        async with fanout.connect([a, b]) as ws:
            fanout.publisher.wait_subscribed(a)
            fanout.publisher.wait_subscribed(b)
            for seq in range(1, 51):
                fanout.publisher.publish(
                    a, seq, {"n": seq, "who": "a"}, ts=seq + 0.25, received_at=1000.0 + seq
                )
                fanout.publisher.publish(other, seq, {"n": seq})
                fanout.publisher.publish(b, seq, [seq, "b"])
            frames = await receive(ws, 100)
            await nothing_more(ws)
        assert [s for d, s in keys(frames) if d == a] == list(range(1, 51))
        assert [s for d, s in keys(frames) if d == b] == list(range(1, 51))
        assert {f["device"] for f in frames} == {a, b}
        first_a = next(f for f in frames if f["device"] == a)
        assert first_a == {
            "device": a,
            "seq": 1,
            "ts": 1.25,
            "received_at": 1001.0,
            "data": {"n": 1, "who": "a"},
        }
        first_b = next(f for f in frames if f["device"] == b)
        assert first_b == {"device": b, "seq": 1, "ts": None, "received_at": 1.5, "data": [1, "b"]}

    run(scenario())


def test_star_client_sees_every_device(fanout: FanoutNode) -> None:
    devices = [unique("star") for _ in range(3)]

    async def scenario() -> None:
        async with fanout.connect(["*"], token=fanout.token(["*"])) as ws:
            fanout.publisher.wait_subscribed(None)
            for seq in range(1, 11):
                for device in devices:
                    fanout.publisher.publish(device, seq, seq)
            fanout.publisher.publish_raw(wire.encode_heartbeat(RING_ID, 123))  # ignored
            frames = await receive(ws, 30)
            await nothing_more(ws)
        for device in devices:
            assert [s for d, s in keys(frames) if d == device] == list(range(1, 11))

    run(scenario())


def test_star_claim_may_follow_named_devices_only(fanout: FanoutNode) -> None:
    wanted, unwanted = unique("w"), unique("u")

    async def scenario() -> None:
        async with fanout.connect([wanted], token=fanout.token(["*"])) as ws:
            fanout.publisher.wait_subscribed(wanted)
            fanout.publisher.publish(unwanted, 1)
            fanout.publisher.publish(wanted, 1, "yes")
            frames = await receive(ws, 1)
            await nothing_more(ws)
        assert keys(frames) == [(wanted, 1)]

    run(scenario())


def test_topic_of_a_device_does_not_match_a_longer_id(fanout: FanoutNode) -> None:
    short = unique("p")
    longer = short + "x"

    async def scenario() -> None:
        async with fanout.connect([short]) as ws:
            fanout.publisher.wait_subscribed(short)
            fanout.publisher.publish(longer, 1)
            fanout.publisher.publish(short, 1)
            frames = await receive(ws, 1)
            await nothing_more(ws)
        assert keys(frames) == [(short, 1)]

    run(scenario())


def test_many_clients_on_one_device_all_receive_everything(fanout: FanoutNode) -> None:
    device = unique("many")
    clients = 25

    async def scenario() -> None:
        conns = [await fanout.connect([device]).__aenter__() for _ in range(clients)]
        try:
            fanout.publisher.wait_subscribed(device)
            for seq in range(1, 201):
                fanout.publisher.publish(device, seq, {"v": seq})
            results = await asyncio.gather(*(receive(ws, 200) for ws in conns))
        finally:
            for ws in conns:
                await ws.close()
        for frames in results:
            assert keys(frames) == [(device, s) for s in range(1, 201)]
        # one subscription upstream for all of them (the XPUB is verbose)
        assert fanout.publisher.events.count(b"\x01" + wire.device_topic(device)) == 1

    run(scenario())


def test_subscription_ends_when_the_last_client_of_a_device_leaves(fanout: FanoutNode) -> None:
    device = unique("ref")
    topic = wire.device_topic(device)

    async def scenario() -> None:
        first = await fanout.connect([device]).__aenter__()
        second = await fanout.connect([device]).__aenter__()
        fanout.publisher.wait_subscribed(device)
        await first.close()
        assert b"\x00" + topic not in fanout.publisher.quiet_events(0.5)
        fanout.publisher.publish(device, 1, "still")
        assert keys(await receive(second, 1)) == [(device, 1)]
        await second.close()
        fanout.publisher.wait_event(b"\x00" + topic)

    run(scenario())


# ------------------------------------------------------------------ refusals
def test_device_outside_the_claim_is_refused_with_403_at_handshake(fanout: FanoutNode) -> None:
    async def scenario() -> None:
        token = fanout.token(["alpha"])
        status, body = await refused_status(fanout, fanout.stream_url(["alpha", "beta"], token))
        assert status == 403 and "'beta'" in body
        status, body = await refused_status(fanout, fanout.stream_url(["*"], token))
        assert status == 403 and '["*"]' in body

    run(scenario())


def test_missing_invalid_or_expired_token_is_refused_with_401(fanout: FanoutNode) -> None:
    expired = jwt.encode(
        {"sub": "c", "devices": ["a"], "exp": int(time.time()) - 60}, SECRET, algorithm="HS256"
    )
    foreign = jwt.encode(
        {"sub": "c", "devices": ["a"]}, "another-secret-of-at-least-32-bytes!!", algorithm="HS256"
    )

    async def scenario() -> None:
        status, body = await refused_status(fanout, fanout.stream_url(["a"]))
        assert (status, "missing token" in body) == (401, True)
        assert (await refused_status(fanout, fanout.stream_url(["a"], "not.a.jwt")))[0] == 401
        assert (await refused_status(fanout, fanout.stream_url(["a"], foreign)))[0] == 401
        status, body = await refused_status(fanout, fanout.stream_url(["a"], expired))
        assert (status, "expired" in body) == (401, True)
        header = {"Authorization": f"Bearer {expired}"}
        assert (await refused_status(fanout, fanout.stream_url(["a"]), additional_headers=header))[0] == 401

    run(scenario())


def test_device_token_cannot_follow_devices(fanout: FanoutNode) -> None:
    async def scenario() -> None:
        token = issue_device_token(SECRET, "a")
        assert (await refused_status(fanout, fanout.stream_url(["a"], token)))[0] == 403

    run(scenario())


def test_no_device_parameter_is_refused_with_400(fanout: FanoutNode) -> None:
    async def scenario() -> None:
        status, body = await refused_status(fanout, fanout.stream_url([], fanout.token(["*"])))
        assert status == 400 and "device=" in body

    run(scenario())


def test_refusals_are_counted_by_reason(fanout: FanoutNode) -> None:
    before = fanout.metric("iotnode_errors_total", stage="fanout", reason="forbidden_device")

    async def scenario() -> None:
        await refused_status(fanout, fanout.stream_url(["nope"], fanout.token(["yes"])))

    run(scenario())
    assert fanout.metric("iotnode_errors_total", stage="fanout", reason="forbidden_device") == before + 1


def test_bearer_header_is_accepted(fanout: FanoutNode) -> None:
    device = unique("bearer")

    async def scenario() -> None:
        headers = {"Authorization": f"Bearer {fanout.token([device])}"}
        async with fanout.connect([device], token="", additional_headers=headers) as ws:
            fanout.publisher.wait_subscribed(device)
            fanout.publisher.publish(device, 7, "hi")
            assert keys(await receive(ws, 1)) == [(device, 7)]

    run(scenario())


# ------------------------------------------------------------------ at-least-once in, once out
def test_republished_records_are_not_forwarded_twice(fanout: FanoutNode) -> None:
    device = unique("dup")
    before = fanout.metric("iotnode_fanout_duplicates_total")

    got: list[tuple[str, int]] = []

    async def scenario() -> None:
        async with fanout.connect([device]) as ws:
            fanout.publisher.wait_subscribed(device)
            for seq in range(1, 11):
                fanout.publisher.publish(device, seq, seq)
            for seq in range(5, 16):  # a publisher restart republishes from its ring's head
                fanout.publisher.publish(device, seq, seq)
            fanout.publisher.publish(device, 3, 3)  # a late resend of an old message
            got.extend(keys(await receive(ws, 15)))
            await nothing_more(ws)

    run(scenario())
    assert got == [(device, s) for s in range(1, 16)]
    assert fanout.metric("iotnode_fanout_duplicates_total") == before + 7


def test_malformed_published_messages_are_dropped_and_the_stream_goes_on(fanout: FanoutNode) -> None:
    device = unique("bad")
    topic = wire.device_topic(device)
    before = fanout.metric("iotnode_errors_total", stage="fanout", reason="bad_message")

    async def scenario() -> None:
        async with fanout.connect([device]) as ws:
            fanout.publisher.wait_subscribed(device)
            fanout.publisher.publish(device, 1, "ok")
            fanout.publisher.publish_raw([topic, b"\xc1", b"x"])  # undecodable record (the meta is not read)
            fanout.publisher.publish_raw(
                [topic, wire.encode_meta(RING_ID, 0, 1), b"\x93\x01"]
            )  # bad envelope
            fanout.publisher.publish_raw([topic])  # wrong frame count
            other = pack_record("someone-else", 9, None, 1.0, None)
            fanout.publisher.publish_raw([topic, wire.encode_meta(RING_ID, 0, 1), other])  # topic mismatch
            fanout.publisher.publish_raw(  # bytes are not JSON
                [topic, wire.encode_meta(RING_ID, 0, 1), pack_record(device, 2, None, 1.0, b"\x00")]
            )
            fanout.publisher.publish(device, 3, "still ok")
            assert keys(await receive(ws, 2)) == [(device, 1), (device, 3)]
            await nothing_more(ws)

    run(scenario())
    assert fanout.metric("iotnode_errors_total", stage="fanout", reason="bad_message") == before + 5


# ------------------------------------------------------------------ metrics
def test_metrics_parse_and_count_streamed_messages_and_clients(fanout: FanoutNode) -> None:
    device = unique("metrics")
    before = fanout.metric("iotnode_messages_total", stage="streamed")
    clients_before = fanout.metric("iotnode_fanout_clients")

    async def scenario() -> None:
        async with fanout.connect([device]) as ws:
            fanout.publisher.wait_subscribed(device)
            for seq in range(1, 21):
                fanout.publisher.publish(device, seq)
            await receive(ws, 20)
            assert fanout.metric("iotnode_fanout_clients") == clients_before + 1

    run(scenario())
    assert fanout.metric("iotnode_messages_total", stage="streamed") == before + 20
    deadline = time.monotonic() + 10
    while fanout.metric("iotnode_fanout_clients") != clients_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fanout.metric("iotnode_fanout_clients") == clients_before
    names = {name for name, _ in fanout.metrics()}
    assert {"iotnode_fanout_slow_client_drops_total", "iotnode_fanout_duplicates_total"} <= names


def test_stream_ends_with_1008_when_its_token_expires(fanout: FanoutNode) -> None:
    device = unique("exp")

    async def scenario() -> None:
        async with fanout.connect([device], token=fanout.token([device], ttl=3)) as ws:
            fanout.publisher.wait_subscribed(device)
            fanout.publisher.publish(device, 1)
            assert keys(await receive(ws, 1)) == [(device, 1)]
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 6)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "token expired")

    run(scenario())


def test_client_messages_are_ignored_and_an_oversized_one_closes_with_1009(fanout: FanoutNode) -> None:
    device = unique("talk")

    async def scenario() -> None:
        async with fanout.connect([device]) as ws:
            fanout.publisher.wait_subscribed(device)
            await ws.send("hello")  # ignored: the stream goes on
            fanout.publisher.publish(device, 1)
            assert keys(await receive(ws, 1)) == [(device, 1)]
            await ws.send("x" * 10_000)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009

    run(scenario())
