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
    frames = [wire.BATCH, msgpack.packb({"ring": RING, "pos": [0, 1], "end": 9}), msgpack.packb([b"only-one"])]
    with pytest.raises(wire.WireError, match="2 positions for 1 records"):
        wire.decode_batch(frames)


def test_ack_round_trips() -> None:
    assert wire.decode_ack(wire.encode_ack(RING, 4096)) == (RING, 4096)


def test_published_record_and_heartbeat_round_trip() -> None:
    frames = wire.encode_published(wire.device_topic("dev"), RING, 32, 96, b"rec")
    assert frames[0] == b"dev\0"
    assert wire.decode_published(frames) == (RING, 32, 96, b"rec")
    assert wire.decode_heartbeat(wire.encode_heartbeat(RING, 1234)) == (RING, 1234)


def test_fetch_records_confirm_round_trip() -> None:
    assert wire.decode_fetch(wire.encode_fetch(RING, 10, 500)) == (RING, 10, 500)
    recs = wire.decode_records(wire.encode_records(RING, 0, 96, 200, [(0, 32, b"x"), (32, 96, b"y")]))
    assert (recs.ring, recs.start, recs.next, recs.tail) == (RING, 0, 96, 200)
    assert [(i.pos, i.end, i.record) for i in recs.items] == [(0, 32, b"x"), (32, 96, b"y")]
    assert wire.decode_confirm(wire.encode_confirm("store", RING, 96)) == ("store", RING, 96)


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


def test_malformed_records_and_meta_are_refused() -> None:
    with pytest.raises(wire.WireError, match="pairs"):
        wire.decode_records([wire.RECORDS, msgpack.packb({"ring": RING, "from": 0, "next": 0, "tail": 0}), b"m"])
    with pytest.raises(wire.WireError, match="record meta"):
        wire.decode_published([b"t\0", msgpack.packb([RING, "0", 1]), b"r"])
    with pytest.raises(wire.WireError, match="heartbeat"):
        wire.decode_heartbeat([wire.HEARTBEAT_TOPIC, msgpack.packb([RING])])
