"""A mergeable latency histogram: integer microseconds, log-linear buckets.

Values below 128 µs get exact buckets; above, each power of two is split into 64
sub-buckets, so a bucket's width is at most 1/64 of its value (~1.6 % precision),
the same idea as HdrHistogram with 6 significant bits.  Histograms from several
processes merge by adding counts; they travel as JSON ``[[bucket, count], ...]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

SUB_BITS = 7  # 128 exact buckets, then 64 per octave
_SUB = 1 << SUB_BITS
_HALF = _SUB >> 1

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0, 99.9)
CURVE_PERCENTILES: tuple[float, ...] = (
    0.0,
    10.0,
    25.0,
    50.0,
    75.0,
    90.0,
    95.0,
    99.0,
    99.5,
    99.9,
    99.95,
    99.99,
    99.999,
    100.0,
)


def bucket_of(us: int) -> int:
    """Bucket index of a value in microseconds (negative values count as 0)."""
    if us < _SUB:
        return us if us > 0 else 0
    shift = us.bit_length() - SUB_BITS
    return _HALF * shift + (us >> shift)


def bucket_value(idx: int) -> float:
    """Representative value (µs) of a bucket: its midpoint."""
    if idx < _SUB:
        return float(idx)
    shift = idx // _HALF - 1
    low = (idx - _HALF * shift) << shift
    return low + ((1 << shift) - 1) / 2.0


class Histogram:
    __slots__ = ("counts", "count", "total_us", "max_us", "min_us")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total_us = 0
        self.max_us = 0
        self.min_us = -1

    def record_us(self, us: int) -> None:
        if us < 0:
            us = 0
        if us < _SUB:
            idx = us
        else:
            shift = us.bit_length() - SUB_BITS
            idx = _HALF * shift + (us >> shift)
        counts = self.counts
        counts[idx] = counts.get(idx, 0) + 1
        self.count += 1
        self.total_us += us
        if us > self.max_us:
            self.max_us = us
        if self.min_us < 0 or us < self.min_us:
            self.min_us = us

    def record(self, seconds: float) -> None:
        self.record_us(int(seconds * 1e6))

    def merge(self, other: Histogram) -> None:
        counts = self.counts
        for idx, n in other.counts.items():
            counts[idx] = counts.get(idx, 0) + n
        self.count += other.count
        self.total_us += other.total_us
        self.max_us = max(self.max_us, other.max_us)
        if other.min_us >= 0 and (self.min_us < 0 or other.min_us < self.min_us):
            self.min_us = other.min_us

    def percentile_us(self, p: float) -> float:
        """Value at percentile ``p`` (0..100); exact at 0 and 100 (min and max)."""
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"percentile must be within 0..100, got {p!r}")
        if self.count == 0:
            return 0.0
        if p >= 100.0:
            return float(self.max_us)
        if p <= 0.0:
            return float(max(self.min_us, 0))
        rank = p / 100.0 * self.count
        seen = 0
        for idx in sorted(self.counts):
            seen += self.counts[idx]
            if seen >= rank:
                return min(bucket_value(idx), float(self.max_us))
        return float(self.max_us)

    def percentiles_ms(self, ps: Iterable[float] = PERCENTILES) -> dict[str, float]:
        return {_label(p): round(self.percentile_us(p) / 1000.0, 3) for p in ps}

    def summary_ms(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {"count": self.count}
        if self.count:
            out["mean"] = round(self.total_us / self.count / 1000.0, 3)
            out.update(self.percentiles_ms())
            out["max"] = round(self.max_us / 1000.0, 3)
        return out

    def curve_ms(self, ps: Sequence[float] = CURVE_PERCENTILES) -> list[list[float]]:
        return [[p, round(self.percentile_us(p) / 1000.0, 3)] for p in ps] if self.count else []

    # ---------------------------------------------------------------- transport
    def to_json(self) -> dict[str, object]:
        return {
            "counts": sorted(self.counts.items()),
            "count": self.count,
            "total_us": self.total_us,
            "max_us": self.max_us,
            "min_us": self.min_us,
        }

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> Histogram:
        h = cls()
        pairs = obj.get("counts")
        if not isinstance(pairs, list):
            raise ValueError(f"histogram: expected a list of [bucket, count], got {pairs!r}")
        for pair in pairs:
            idx, n = pair
            h.counts[int(idx)] = h.counts.get(int(idx), 0) + int(n)
        h.count = int(obj["count"])  # type: ignore[arg-type]
        h.total_us = int(obj["total_us"])  # type: ignore[arg-type]
        h.max_us = int(obj["max_us"])  # type: ignore[arg-type]
        h.min_us = int(obj["min_us"])  # type: ignore[arg-type]
        return h


def _label(p: float) -> str:
    return "p" + (f"{p:g}")
