"""Property test: random append/read/pop/reopen sequences against a simple model."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.ring import Ring
from node.ring import descriptor as D

CAP = 4096

ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.lists(st.integers(0, D.max_record_for(CAP)), min_size=1, max_size=6)),
        st.tuples(st.just("read"), st.integers(1, 20)),
        st.tuples(st.just("pop"), st.integers(0, 20)),
        st.tuples(st.just("reopen"), st.just(0)),
    ),
    min_size=5,
    max_size=60,
)


class Model:
    """Positions exactly as the ring assigns them: 32-byte records, padding at the wrap.

    The reader's scan steps over the wrap padding after the last record it returns, and
    a pop to a record's end also releases padding the reader has scanned past (the
    head then stands at the next record: node/ring/reader.py, ``pop``)."""

    def __init__(self) -> None:
        self.head = self.tail = 0
        self.scanned = 0  # the reader's cursor: where its last read stopped
        self.records: list[tuple[int, int, bytes]] = []  # (pos, end, payload), un-popped
        self.counter = 0

    def payloads(self, sizes: list[int]) -> list[bytes]:
        out = []
        for size in sizes:
            out.append(self.counter.to_bytes(4, "little") * (size // 4) + b"#" * (size % 4))
            self.counter += 1
        return out

    def append(self, payloads: list[bytes]) -> int:
        """How many of ``payloads`` fit (a prefix); records them."""
        for n, payload in enumerate(payloads):
            rsz = D.aligned_record_size(len(payload))
            idx = self.tail % CAP
            pad = CAP - idx if idx + rsz > CAP else 0
            if self.tail + pad + rsz - self.head > CAP:
                return n
            pos = self.tail + pad
            self.records.append((pos, pos + rsz, payload))
            self.tail = pos + rsz
        return len(payloads)

    def read(self, n: int) -> None:
        if n:
            end = self.records[n - 1][1]
            if len(self.records) > n and self.records[n][0] > end:
                end = self.records[n][0]  # the scan stepped over the padding
            self.scanned = max(self.scanned, end)

    def pop(self, k: int) -> None:
        head = self.records[k - 1][1]
        nxt = self.records[k][0] if len(self.records) > k else None
        if self.scanned > head and (nxt is None or nxt >= self.scanned):
            head = self.scanned  # only padding between: released too
        self.head = head
        del self.records[:k]


def run(backend: str, program: list[tuple[str, object]]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ringmodel-"))
    path = tmp / "m.ring"
    model = Model()
    ring = Ring.open(path, capacity=CAP, backend=backend)
    reader = ring.reader()
    read_upto = 0  # how many model records the reader has read since the last reopen
    try:
        for op, arg in program:
            if op == "append":
                payloads = model.payloads(list(arg))  # type: ignore[call-overload]
                assert ring.append_batch(payloads) == model.append(payloads)
            elif op == "read":
                recs = reader.read(ring.head, max_records=int(arg))  # type: ignore[call-overload]
                assert [(r.pos, r.end, r.payload) for r in recs] == model.records[: int(arg)]  # type: ignore[call-overload]
                model.read(len(recs))
                read_upto = max(read_upto, len(recs))
            elif op == "pop":
                k = min(int(arg), read_upto)  # type: ignore[call-overload]
                if k:
                    assert reader.pop(model.records[k - 1][1]) == k
                    model.pop(k)
                    read_upto -= k
            else:
                ring.close()
                ring = Ring.open(path, capacity=CAP, backend=backend)
                assert ring.recovered
                reader = ring.reader()
                read_upto = 0
                model.scanned = 0
            assert ring.head == model.head
            assert ring.tail == model.tail
            assert ring.depth == len(model.records)
            assert ring.bytes_used == model.tail - model.head
    finally:
        ring.close()
        shutil.rmtree(tmp)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(program=ops)
def test_random_operation_sequences_match_the_model(backend: str, program: list[tuple[str, object]]) -> None:
    run(backend, program)
