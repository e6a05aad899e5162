"""Inter-stage ZeroMQ messages, free of I/O.

Every message is a list of frames (``list[bytes]``, sent with ``send_multipart``);
the first frame is a short verb, control fields are msgpack (never pickle).  The
functions here only build and parse frames; sockets live in ``node/workers``.

monitor (DEALER) -> router (ROUTER)::

    [b"BATCH", meta, records]           meta = {"ring": id, "pos": [p0, p1, ...], "end": end,
                                                "start": s, "base": b}
        records: ONE frame, a msgpack array of the records (bin): a frame costs ~7 us
        of Python per side, so one frame per record would cost ~15 us per record.
        start: the read position the batch covers from (<= p0: padding at the wrap point);
        base: the sender's acked-through position (everything before it is durable downstream).
        Both optional for older senders (default: start = p0, base = start).
    [b"ACK", {"ring": id, "end": end}]  router -> monitor, once persisted in the fan-in ring

publisher (XPUB) -> fanout (SUB), live subscribers only::

    [topic, meta, record]               topic = device_id + b"\\0",
                                        meta = [ring_id, pos, end, epoch, n]
        n: messages published on this topic since the publisher started (1, 2, ...),
        epoch: a random number drawn at each publisher start, so a restart (n again
        from 1) is not mistaken for a gap.  A subscriber that sees n jump by more than
        1 on a topic missed messages (high-water-mark drops).
    [HEARTBEAT_TOPIC, [ring_id, published]]   every NODE_PUB_HEARTBEAT_MS (5 s), and per new subscription
    XPUB <- SUB: b"\\x01" + prefix (subscribe), b"\\x00" + prefix (unsubscribe)

store (DEALER) -> publisher (ROUTER, the replay endpoint): durable subscribers pull::

    [b"FETCH", {"ring": id, "from": pos, "max": n, "wait": bool}]
        wait (optional, default false): when nothing past ``from`` is committed yet, the
        publisher parks the request and answers once records arrive, or empty after a
        bounded time (long poll).
        -> [b"RECORDS", {"ring": id, "from": start, "ask": pos, "next": next, "tail": tail,
                         "ends": [e0, e1, ...]}, records]
        records: ONE frame, a msgpack array of the record payloads (bin); record i spans
        [ends[i-1], ends[i]) of the ring (record 0 starts at ``start``).  ``ask`` echoes
        the FETCH's ``from`` (``start`` differs when ``from`` was below the head).
    [b"CONFIRM", {"name": name, "ring": id, "pos": cursor}]   (no answer)

A malformed message raises :class:`WireError` carrying what was wrong; receivers
log it and drop that message (it can only come from a bug or a foreign peer).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from node.errors import NodeError

BATCH = b"BATCH"
ACK = b"ACK"
FETCH = b"FETCH"
RECORDS = b"RECORDS"
CONFIRM = b"CONFIRM"
HEARTBEAT_TOPIC = b"\x01hb"
TOPIC_END = b"\0"


class WireError(NodeError, ValueError):
    """A ZeroMQ message that does not follow this module's formats."""


_packer = msgpack.Packer(use_bin_type=True)


def _pack(obj: Any) -> bytes:
    data: bytes = _packer.pack(obj)
    return data


def _unpack(frame: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"{what}: undecodable msgpack ({type(exc).__name__}, {len(frame)} bytes)") from None


def _field(meta: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(meta, dict):
        raise WireError(f"{what}: expected a map, got {type(meta).__name__}")
    value = meta.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise WireError(f"{what}: field {key!r} expected {kind}, got {value!r}")
    return value


def _verb(frames: list[bytes], verb: bytes, minimum: int) -> None:
    if len(frames) < minimum or frames[0] != verb:
        head = frames[0][:16] if frames else b""
        raise WireError(f"expected {verb!r} with >= {minimum} frames, got {head!r} with {len(frames)}")


# --------------------------------------------------------------- monitor -> router
class Batch(NamedTuple):
    ring: bytes
    positions: list[int]
    end: int
    records: list[bytes]
    start: int  # the batch covers [start, end) of the source ring
    base: int  # the sender has been acked for everything before base


def encode_batch(
    ring: bytes,
    positions: list[int],
    end: int,
    records: list[bytes],
    *,
    start: int | None = None,
    base: int | None = None,
) -> list[bytes]:
    if len(positions) != len(records):
        raise ValueError(f"expected one position per record, got {len(positions)} and {len(records)}")
    meta: dict[str, Any] = {"ring": ring, "pos": positions, "end": end}
    if start is not None:
        meta["start"] = start
    if base is not None:
        meta["base"] = base
    return [BATCH, _pack(meta), _pack(records)]


def _meta_and_body(frames: list[bytes], verb: bytes, name: str) -> Any:
    """The meta map of a 3-frame message ``[verb, meta, body]`` (the body is the caller's)."""
    _verb(frames, verb, 3)
    if len(frames) != 3:
        raise WireError(f"{name}: expected 3 frames, got {len(frames)}")
    return _unpack(frames[1], f"{name} meta")


def decode_batch(frames: list[bytes]) -> Batch:
    meta = _meta_and_body(frames, BATCH, "BATCH")
    ring = _field(meta, "ring", bytes, "BATCH")
    positions = _field(meta, "pos", list, "BATCH")
    end = _field(meta, "end", int, "BATCH")
    records = _unpack(frames[2], "BATCH records")
    if not isinstance(records, list) or not all(isinstance(r, bytes) for r in records):
        raise WireError(f"BATCH: records frame is not an array of bin, got {type(records).__name__}")
    if len(positions) != len(records):
        raise WireError(f"BATCH: {len(positions)} positions for {len(records)} records")
    start = _field(meta, "start", int, "BATCH") if "start" in meta else (positions[0] if positions else end)
    base = _field(meta, "base", int, "BATCH") if "base" in meta else start
    if not base <= start <= end or any(not isinstance(p, int) or isinstance(p, bool) for p in positions):
        raise WireError(
            f"BATCH: expected integer positions and base <= start <= end, got {base}, {start}, {end}"
        )
    return Batch(ring, positions, end, records, start, base)


class Ack(NamedTuple):
    ring: bytes
    end: int


def encode_ack(ring: bytes, end: int) -> list[bytes]:
    return [ACK, _pack({"ring": ring, "end": end})]


def decode_ack(frames: list[bytes]) -> Ack:
    _verb(frames, ACK, 2)
    meta = _unpack(frames[1], "ACK")
    return Ack(_field(meta, "ring", bytes, "ACK"), _field(meta, "end", int, "ACK"))


# --------------------------------------------------------------- publisher -> subscribers
def device_topic(device_id: str) -> bytes:
    """The PUB topic of a device: its id, NUL-terminated so ``a`` does not match ``ab``."""
    return device_id.encode() + TOPIC_END


class Published(NamedTuple):
    ring: bytes
    pos: int
    end: int
    record: bytes
    epoch: int
    n: int


def encode_meta(ring: bytes, pos: int, end: int, epoch: int = 0, n: int = 0) -> bytes:
    return _pack((ring, pos, end, epoch, n))


def decode_meta(frame: bytes) -> tuple[bytes, int, int, int, int]:
    """``(ring_id, pos, end, epoch, n)`` of a published record's meta frame."""
    meta = _unpack(frame, "record meta")
    if (
        not isinstance(meta, list)
        or len(meta) != 5
        or not isinstance(meta[0], bytes)
        or not all(type(v) is int for v in meta[1:])
    ):
        raise WireError(f"record meta: expected [bytes, int, int, int, int], got {meta!r}")
    return meta[0], meta[1], meta[2], meta[3], meta[4]


def encode_published(
    topic: bytes, ring: bytes, pos: int, end: int, record: bytes, epoch: int = 0, n: int = 0
) -> list[bytes]:
    return [topic, encode_meta(ring, pos, end, epoch, n), record]


def decode_published(frames: list[bytes]) -> Published:
    if len(frames) != 3:
        raise WireError(f"published record: expected 3 frames, got {len(frames)}")
    ring, pos, end, epoch, n = decode_meta(frames[1])
    return Published(ring, pos, end, frames[2], epoch, n)


class Subscription(NamedTuple):
    subscribe: bool  # False: unsubscribe
    prefix: bytes


def decode_subscription(frame: bytes) -> Subscription:
    """A message an XPUB socket reads: ``b"\\x01" + prefix`` or ``b"\\x00" + prefix``."""
    if not frame or frame[0] > 1:
        raise WireError(f"subscription: expected a first byte 0 or 1, got {frame[:16]!r}")
    return Subscription(frame[0] == 1, frame[1:])


def encode_heartbeat(ring: bytes, tail: int) -> list[bytes]:
    return [HEARTBEAT_TOPIC, _pack((ring, tail))]


def decode_heartbeat(frames: list[bytes]) -> tuple[bytes, int]:
    if len(frames) != 2 or frames[0] != HEARTBEAT_TOPIC:
        raise WireError(f"heartbeat: expected 2 frames starting {HEARTBEAT_TOPIC!r}")
    body = _unpack(frames[1], "heartbeat")
    if (
        not isinstance(body, list)
        or len(body) != 2
        or not isinstance(body[0], bytes)
        or not isinstance(body[1], int)
    ):
        raise WireError(f"heartbeat: expected [bytes, int], got {body!r}")
    return body[0], body[1]


# --------------------------------------------------------------- replay / confirm
class Fetch(NamedTuple):
    ring: bytes
    start: int
    max: int
    wait: bool = False


def encode_fetch(ring: bytes, start: int, max_records: int, wait: bool = False) -> list[bytes]:
    meta: dict[str, Any] = {"ring": ring, "from": start, "max": max_records}
    if wait:
        meta["wait"] = True
    return [FETCH, _pack(meta)]


def decode_fetch(frames: list[bytes]) -> Fetch:
    _verb(frames, FETCH, 2)
    meta = _unpack(frames[1], "FETCH")
    wait = meta.get("wait", False) if isinstance(meta, dict) else False
    if not isinstance(wait, bool):
        raise WireError(f"FETCH: field 'wait' expected bool, got {wait!r}")
    return Fetch(
        _field(meta, "ring", bytes, "FETCH"),
        _field(meta, "from", int, "FETCH"),
        _field(meta, "max", int, "FETCH"),
        wait,
    )


class Item(NamedTuple):
    """One record of a RECORDS answer: it spans ``[pos, end)`` of the ring."""

    pos: int
    end: int
    record: bytes


class Records(NamedTuple):
    ring: bytes
    start: int  # where the answer starts (the FETCH's ``from``, or the head when it was below)
    ask: int  # the FETCH's ``from``
    next: int  # where the next FETCH continues (the last record's end, or ``start``)
    tail: int  # the ring's tail when answered
    ends: list[int]
    records: list[bytes]

    @property
    def items(self) -> list[Item]:
        """The records with their spans (tests and tools; the store walks ``ends``)."""
        starts = [self.start, *self.ends[:-1]]
        return [Item(p, e, r) for p, e, r in zip(starts, self.ends, self.records, strict=False)]


def encode_records(
    ring: bytes,
    start: int,
    next_pos: int,
    tail: int,
    ends: list[int],
    records: list[bytes],
    ask: int | None = None,
) -> list[bytes]:
    """``records[i]`` spans ``[ends[i-1], ends[i])`` (``[start, ends[0])`` for the first)."""
    if len(ends) != len(records):
        raise ValueError(f"expected one end per record, got {len(ends)} and {len(records)}")
    meta = {
        "ring": ring,
        "from": start,
        "ask": start if ask is None else ask,
        "next": next_pos,
        "tail": tail,
        "ends": ends,
    }
    return [RECORDS, _pack(meta), _pack(records)]


def decode_records(frames: list[bytes]) -> Records:
    meta = _meta_and_body(frames, RECORDS, "RECORDS")
    ring = _field(meta, "ring", bytes, "RECORDS")
    start = _field(meta, "from", int, "RECORDS")
    ask = _field(meta, "ask", int, "RECORDS")
    next_pos = _field(meta, "next", int, "RECORDS")
    tail = _field(meta, "tail", int, "RECORDS")
    ends = _field(meta, "ends", list, "RECORDS")
    records = _unpack(frames[2], "RECORDS records")
    if not isinstance(records, list) or not all(type(r) is bytes for r in records):
        raise WireError(f"RECORDS: records frame is not an array of bin, got {type(records).__name__}")
    if len(ends) != len(records):
        raise WireError(f"RECORDS: {len(ends)} ends for {len(records)} records")
    prev = start
    for end in ends:
        if type(end) is not int or end <= prev:
            raise WireError(
                f"RECORDS: expected increasing integer ends after {start}, got {end!r} after {prev}"
            )
        prev = end
    if next_pos != prev:
        raise WireError(f"RECORDS: next {next_pos} is not the last record's end {prev}")
    return Records(ring, start, ask, next_pos, tail, ends, records)


class Confirm(NamedTuple):
    name: str
    ring: bytes
    pos: int


def encode_confirm(name: str, ring: bytes, pos: int) -> list[bytes]:
    return [CONFIRM, _pack({"name": name, "ring": ring, "pos": pos})]


def decode_confirm(frames: list[bytes]) -> Confirm:
    _verb(frames, CONFIRM, 2)
    meta = _unpack(frames[1], "CONFIRM")
    return Confirm(
        _field(meta, "name", str, "CONFIRM"),
        _field(meta, "ring", bytes, "CONFIRM"),
        _field(meta, "pos", int, "CONFIRM"),
    )
