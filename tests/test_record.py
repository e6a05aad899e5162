import msgpack
import pytest

from node.record import RecordError, device_id_of, pack_record, unpack_record


def test_envelope_round_trips_every_field() -> None:
    payload = pack_record("dev-1", 7, 1.5, 1700000000.25, {"t": [1, 2.5, "x", None, True]})
    rec = unpack_record(payload)
    assert rec == ("dev-1", 7, 1.5, 1700000000.25, {"t": [1, 2.5, "x", None, True]})
    assert device_id_of(payload) == "dev-1"


def test_device_id_is_read_without_decoding_data() -> None:
    payload = pack_record("ü-device", 0, None, 1.0, {"big": "x" * 10000})
    assert device_id_of(payload) == "ü-device"


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"a": 1}), msgpack.packb([1, 2, 3, 4, 5])],
)
def test_foreign_bytes_raise_record_error(payload: bytes) -> None:
    with pytest.raises(RecordError):
        unpack_record(payload)
    with pytest.raises(RecordError):
        device_id_of(payload)


@pytest.mark.parametrize("device_id", ["", "d", "x" * 31, "y" * 32, "é" * 100, "z" * 255, "w" * 300])
def test_device_id_of_matches_the_full_decode_for_every_id_length(device_id: str) -> None:
    payload = pack_record(device_id, 1, None, 1.0, {"k": "v"})
    assert device_id_of(payload) == unpack_record(payload).device_id == device_id


@pytest.mark.parametrize(
    "payload", [b"\x95\xa5dev", b"\x95\xd9\x09dev", b"\x95\xa2\xff\xfe\x01", b"\x95\x01\x02"]
)
def test_truncated_or_non_utf8_device_id_raises_record_error(payload: bytes) -> None:
    with pytest.raises(RecordError):
        device_id_of(payload)
