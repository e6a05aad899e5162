"""Device simulator: a few hundred sensors sending realistic readings to a node.

Each simulated sensor is one device with its own connection (``node.client``):
environment sensors report temperature and humidity (a slow daily curve plus
noise), trackers report GPS position, speed and battery while driving around a
base point.  The run is bounded (``--duration``), then every sensor flushes and
the totals are printed as one JSON line.

    python examples/simulator.py --sensors 200 --duration 10

Tokens are signed with the local node's secret (``NODE_JWT_SECRET`` or
``NODE_DATA_DIR/jwt_secret``, exactly what ``python -m node token`` uses), so
run it on the node's machine, from the repository root, with the node's
environment.  Exit status 0 when every message was acked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from node.auth import issue_device_token, load_secret  # noqa: E402
from node.client import Backoff, ClientError, DeviceClient  # noqa: E402
from node.config import load_settings  # noqa: E402

MAX_SENSORS = 10_000
MAX_DURATION = 3600.0


class EnvSensor:
    """Temperature (degC) and relative humidity (%) of a room or a field."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.base = rng.uniform(15.0, 25.0)
        self.phase = rng.uniform(0, 2 * math.pi)
        self.temp = self.base

    def reading(self, now: float) -> dict[str, Any]:
        daily = 3.0 * math.sin(2 * math.pi * now / 86400 + self.phase)
        self.temp += 0.2 * (self.base + daily - self.temp) + self.rng.gauss(0, 0.05)
        humidity = min(100.0, max(0.0, 55.0 - 1.5 * (self.temp - self.base) + self.rng.gauss(0, 0.5)))
        return {"type": "env", "temperature_c": round(self.temp, 2), "humidity_pct": round(humidity, 1)}


class Tracker:
    """A GPS tracker on a vehicle driving around a base point."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.lat = 48.8566 + rng.uniform(-0.05, 0.05)
        self.lon = 2.3522 + rng.uniform(-0.05, 0.05)
        self.heading = rng.uniform(0, 360)
        self.speed = rng.uniform(0, 50)  # km/h
        self.battery = rng.uniform(60, 100)
        self.last = time.time()

    def reading(self, now: float) -> dict[str, Any]:
        dt = max(0.0, now - self.last)
        self.last = now
        self.heading = (self.heading + self.rng.gauss(0, 10)) % 360
        self.speed = min(90.0, max(0.0, self.speed + self.rng.gauss(0, 3)))
        km = self.speed * dt / 3600
        self.lat += km / 111.0 * math.cos(math.radians(self.heading))
        self.lon += km / (111.0 * math.cos(math.radians(self.lat))) * math.sin(math.radians(self.heading))
        self.battery = max(0.0, self.battery - 0.001 * dt)
        return {
            "type": "gps",
            "lat": round(self.lat, 6),
            "lon": round(self.lon, 6),
            "speed_kmh": round(self.speed, 1),
            "heading_deg": round(self.heading, 1),
            "battery_pct": round(self.battery, 1),
        }


async def run_sensor(
    client: DeviceClient, model: EnvSensor | Tracker, deadline: float, interval: float, rng: random.Random
) -> int:
    sent = 0
    await asyncio.sleep(rng.uniform(0, interval))  # sensors are not synchronised
    while time.monotonic() < deadline:
        now = time.time()
        await client.send(model.reading(now), ts=now)
        sent += 1
        await asyncio.sleep(interval * rng.uniform(0.9, 1.1))
    return sent


async def simulate(args: argparse.Namespace) -> dict[str, Any]:
    secret = load_secret(load_settings())
    rng = random.Random(args.seed)
    clients: list[DeviceClient] = []
    models: list[EnvSensor | Tracker] = []
    for i in range(args.sensors):
        device = f"{args.prefix}{i:04d}"
        clients.append(
            DeviceClient(
                args.url,
                issue_device_token(secret, device),
                binary=not args.json,
                backoff=Backoff(0.2, 5.0),
                rng=random.Random(rng.random()),
            )
        )
        models.append(Tracker(rng) if rng.random() < args.gps_share else EnvSensor(rng))
    started = time.monotonic()
    try:
        await asyncio.gather(*(c.start(wait=True, timeout=args.connect_timeout) for c in clients))
        deadline = time.monotonic() + args.duration
        counts = await asyncio.gather(
            *(
                run_sensor(c, m, deadline, args.interval, random.Random(rng.random()))
                for c, m in zip(clients, models, strict=True)
            )
        )
        flush_deadline = time.monotonic() + args.flush_timeout
        for c in clients:
            try:
                await c.flush(max(0.01, flush_deadline - time.monotonic()))
            except TimeoutError:
                break
    finally:
        await asyncio.gather(*(c.close(flush=False) for c in clients), return_exceptions=True)
    elapsed = time.monotonic() - started
    acked = sum(c.acked for c in clients)
    return {
        "sensors": args.sensors,
        "sent": sum(counts),
        "acked": acked,
        "rejected": sum(c.rejected for c in clients),
        "reconnects": sum(max(0, c.connections - 1) for c in clients),
        "seconds": round(elapsed, 2),
        "acked_per_second": round(acked / elapsed, 1) if elapsed else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="ws://127.0.0.1:8000/v1/ingest")
    p.add_argument(
        "--sensors", type=int, default=200, help=f"simulated devices (1..{MAX_SENSORS}, default 200)"
    )
    p.add_argument(
        "--duration", type=float, default=10.0, help=f"seconds of sending (<= {MAX_DURATION:g}, default 10)"
    )
    p.add_argument(
        "--interval", type=float, default=1.0, help="seconds between readings of one sensor (default 1)"
    )
    p.add_argument("--gps-share", type=float, default=0.3, help="fraction of sensors that are GPS trackers")
    p.add_argument("--prefix", default="sim-", help="device id prefix (default sim-)")
    p.add_argument("--json", action="store_true", help="JSON text frames instead of MessagePack")
    p.add_argument("--seed", type=int, default=None, help="random seed (repeatable payloads)")
    p.add_argument("--connect-timeout", type=float, default=15.0)
    p.add_argument("--flush-timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    if not 1 <= args.sensors <= MAX_SENSORS:
        p.error(f"--sensors must be in 1..{MAX_SENSORS}, got {args.sensors}")
    if not 0 < args.duration <= MAX_DURATION:
        p.error(f"--duration must be in (0, {MAX_DURATION:g}], got {args.duration}")
    if not args.interval > 0:
        p.error(f"--interval must be > 0, got {args.interval}")
    if not 0 <= args.gps_share <= 1:
        p.error(f"--gps-share must be in [0, 1], got {args.gps_share}")
    try:
        summary = asyncio.run(simulate(args))
    except (ClientError, TimeoutError) as exc:
        print(f"simulator: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0 if summary["acked"] == summary["sent"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
