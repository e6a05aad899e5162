"""Geohash encoding (base-32 interleaved latitude/longitude bits), free of I/O.

The storage tier tags every record with a *coarse* geohash of its device's
position (``PRECISION`` = 5 characters, a cell of about 4.9 km x 4.9 km) so that a
time-series database gets one bounded tag, not a float per device.

    >>> encode(48.8566, 2.3522, 5)
    'u09tv'
"""

from __future__ import annotations

PRECISION = 5
_BASE32 = "0123456789bcdefghjkmnpqrstuvwxyz"


def encode(lat: float, lon: float, precision: int = PRECISION) -> str:
    """The geohash of ``(lat, lon)`` with ``precision`` characters (1..12).

    ``ValueError`` when ``lat`` is outside [-90, 90] or ``lon`` outside [-180, 180].
    """
    if not 1 <= precision <= 12:
        raise ValueError(f"precision: expected 1..12, got {precision}")
    if not -90.0 <= lat <= 90.0:
        raise ValueError(f"latitude: expected -90..90, got {lat}")
    if not -180.0 <= lon <= 180.0:
        raise ValueError(f"longitude: expected -180..180, got {lon}")
    ranges = {"lon": [-180.0, 180.0], "lat": [-90.0, 90.0]}
    point = {"lon": lon, "lat": lat}
    out: list[str] = []
    bits = 0
    value = 0
    axis = "lon"  # bits alternate: longitude first
    while len(out) < precision:
        span = ranges[axis]
        mid = (span[0] + span[1]) / 2
        upper = point[axis] >= mid
        value = value << 1 | upper
        span[0 if upper else 1] = mid  # keep the half the point is in
        axis = "lat" if axis == "lon" else "lon"
        bits += 1
        if bits == 5:
            out.append(_BASE32[value])
            bits = 0
            value = 0
    return "".join(out)
