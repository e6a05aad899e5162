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
