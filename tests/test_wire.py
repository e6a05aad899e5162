import msgpack
import pytest

from node import wire

RING = b"r" * 16


def test_batch_round_trips_positions_and_records() -> None:
    frames = wire.encode_batch(RING, [0, 64, 160], 224, [b"a", b"bb", b"ccc"])
    assert wire.decode_batch(frames) == (RING, [0, 64, 160], 224, [b"a", b"bb", b"ccc"], 0, 0)


def test_batch_carries_start_and_base_for_resend_dedup() -> None:
    frames = wire.encode_batch(RING, [96, 160], 224, [b"a", b"b"], start=64, base=32)
    batch = wire.decode_batch(frames)
    assert (batch.start, batch.base) == (64, 32)


def test_batch_records_travel_in_one_frame_and_must_be_bin() -> None:
    frames = wire.encode_batch(RING, [0, 64], 128, [b"a", b"b"])
    assert len(frames) == 3
    with pytest.raises(wire.WireError, match="array of bin"):
        wire.decode_batch([*frames[:2], msgpack.packb(["a", "b"])])
    with pytest.raises(wire.WireError, match="expected 3 frames"):
        wire.decode_batch([*frames, b"extra"])


def test_batch_with_base_after_start_is_refused() -> None:
    frames = wire.encode_batch(RING, [96], 160, [b"a"], start=96, base=128)
    with pytest.raises(wire.WireError, match="base <= start <= end"):
        wire.decode_batch(frames)


def test_batch_with_mismatched_counts_is_refused() -> None:
    with pytest.raises(ValueError):
        wire.encode_batch(RING, [0], 64, [b"a", b"b"])
    frames = [
        wire.BATCH,
        msgpack.packb({"ring": RING, "pos": [0, 1], "end": 9}),
        msgpack.packb([b"only-one"]),
    ]
    with pytest.raises(wire.WireError, match="2 positions for 1 records"):
        wire.decode_batch(frames)


def test_ack_round_trips() -> None:
    assert wire.decode_ack(wire.encode_ack(RING, 4096)) == (RING, 4096)


def test_published_record_carries_epoch_and_per_topic_number_and_heartbeat_round_trips() -> None:
    frames = wire.encode_published(wire.device_topic("dev"), RING, 32, 96, b"rec", epoch=77, n=5)
    assert frames[0] == b"dev\0"
    assert wire.decode_published(frames) == (RING, 32, 96, b"rec", 77, 5)
    assert wire.decode_heartbeat(wire.encode_heartbeat(RING, 1234)) == (RING, 1234)


def test_xpub_subscription_messages_decode_to_subscribe_flag_and_prefix() -> None:
    assert wire.decode_subscription(b"\x01dev\0") == (True, b"dev\0")
    assert wire.decode_subscription(b"\x00dev\0") == (False, b"dev\0")
    assert wire.decode_subscription(b"\x01") == (True, b"")
    for bad in (b"", b"\x02dev"):
        with pytest.raises(wire.WireError, match="subscription"):
            wire.decode_subscription(bad)


def test_fetch_records_confirm_round_trip() -> None:
    assert wire.decode_fetch(wire.encode_fetch(RING, 10, 500)) == (RING, 10, 500, False)
    assert wire.decode_fetch(wire.encode_fetch(RING, 10, 500, wait=True)).wait is True
    recs = wire.decode_records(wire.encode_records(RING, 0, 96, 200, [32, 96], [b"x", b"y"]))
    assert (recs.ring, recs.start, recs.ask, recs.next, recs.tail) == (RING, 0, 0, 96, 200)
    assert [(i.pos, i.end, i.record) for i in recs.items] == [(0, 32, b"x"), (32, 96, b"y")]
    empty = wire.decode_records(wire.encode_records(RING, 64, 64, 64, [], [], ask=32))
    assert (empty.start, empty.ask, empty.next, empty.items) == (64, 32, 64, [])
    assert wire.decode_confirm(wire.encode_confirm("store", RING, 96)) == ("store", RING, 96)


def test_records_travel_in_three_frames_whatever_their_count() -> None:
    frames = wire.encode_records(
        RING, 0, 32 * 1000, 32 * 1000, [32 * (i + 1) for i in range(1000)], [b"r"] * 1000
    )
    assert len(frames) == 3
    assert len(wire.decode_records(frames).records) == 1000


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"NOPE", b"\x80"],
        [wire.ACK, b"\xc1"],
        [wire.ACK, msgpack.packb({"ring": RING, "end": "12"})],
        [wire.ACK, msgpack.packb({"ring": RING, "end": True})],
        [wire.ACK, msgpack.packb([1, 2])],
    ],
)
def test_malformed_ack_raises_wire_error_naming_the_problem(frames: list[bytes]) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_ack(frames)


def records_frames(**meta: object) -> list[bytes]:
    base = {"ring": RING, "from": 0, "ask": 0, "next": 32, "tail": 32, "ends": [32]}
    base.update(meta)
    return [wire.RECORDS, msgpack.packb(base), msgpack.packb([b"x"])]


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        (
            [wire.RECORDS, msgpack.packb({"ring": RING, "from": 0, "next": 0, "tail": 0})],
            "expected b'RECORDS'",
        ),
        (records_frames(ends=[32, 64]), "2 ends for 1 records"),
        (records_frames(ends=[0]), "increasing integer ends"),
        (records_frames(ends=["32"]), "increasing integer ends"),
        (records_frames(next=64), "next 64 is not the last record's end 32"),
        (records_frames(ask=None), "'ask'"),
        ([*records_frames()[:2], msgpack.packb(["x"])], "array of bin"),
        ([*records_frames(), b"extra"], "expected 3 frames"),
    ],
)
def test_malformed_records_are_refused_naming_the_problem(frames: list[bytes], match: str) -> None:
    with pytest.raises(wire.WireError, match=match):
        wire.decode_records(frames)


def test_malformed_meta_fetch_and_heartbeat_are_refused() -> None:
    with pytest.raises(wire.WireError, match="record meta"):
        wire.decode_published([b"t\0", msgpack.packb([RING, "0", 1, 0, 1]), b"r"])
    with pytest.raises(wire.WireError, match="record meta"):
        wire.decode_published([b"t\0", msgpack.packb([RING, 0, 1]), b"r"])  # no epoch / n
    with pytest.raises(wire.WireError, match="'wait' expected bool, got 1"):
        wire.decode_fetch([wire.FETCH, msgpack.packb({"ring": RING, "from": 0, "max": 1, "wait": 1})])
    with pytest.raises(wire.WireError, match="heartbeat"):
        wire.decode_heartbeat([wire.HEARTBEAT_TOPIC, msgpack.packb([RING])])
