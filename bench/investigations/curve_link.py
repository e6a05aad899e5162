"""What CURVE costs on the monitor -> router link: ipc:// vs tcp:// open vs tcp:// with CURVE.

    python -m bench.investigations.curve_link [--records 200000] [--rounds 2] [--durability process|power]

For each link, router + monitor run as real processes between real ring files (a
temporary data dir); the ingress ring is pre-filled, then the time from the first
record reaching the fan-in ring until all have (catch-up, as in
``bench.monitor_router``) gives records/s.  The baseline is the default ``ipc://``
link measured in the same run; the links are measured in turn, ``--rounds`` times,
and the best round of each is reported (the machine is shared: the best is the
least disturbed).  tcp:// goes to 127.0.0.1 only.  Every wait is bounded.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.monitor_router import RING_BYTES, consume, envelopes, fill
from bench.stages import stage_env, start, stop
from bench.targets import free_port
from node.ring import Ring

LINKS = ("ipc", "tcp-open", "tcp-curve")


def link_env(data: Path, durability: str, link: str) -> dict[str, str]:
    env = stage_env(data, durability, RING_BYTES, "monitor", "router")
    if link == "ipc":
        return env
    env["NODE_ROUTER_BIND"] = f"tcp://127.0.0.1:{free_port()}"
    if link == "tcp-open":
        env["NODE_CURVE"] = "off"
    else:
        clients = data / "clients"  # empty: the node's own monitor is trusted through the data dir
        clients.mkdir()
        env["NODE_CURVE_CLIENTS_DIR"] = str(clients)
    return env


def catch_up(records: list[bytes], d: Path, durability: str, link: str, round_: int) -> float:
    data = d / f"{link}-{round_}"
    data.mkdir()
    env = link_env(data, durability, link)
    ingress = Ring.open(data / "ingress.ring", capacity=RING_BYTES, durability=durability)
    fanin = Ring.open(data / "fanin.ring", capacity=RING_BYTES, durability=durability)
    fill(ingress, records)
    procs = [start("router", env, data / "router.log"), start("monitor", env, data / "monitor.log")]
    try:
        first, last = consume(fanin, len(records))
        return (len(records) - 1) / (last - first)
    finally:
        stop(procs)
        ingress.close()
        fanin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--durability", choices=("process", "power"), default="process")
    args = parser.parse_args()
    records = envelopes(args.records)
    best = {link: 0.0 for link in LINKS}
    with tempfile.TemporaryDirectory(prefix="bench-curve-") as tmp:
        for round_ in range(args.rounds):
            for link in LINKS:
                best[link] = max(best[link], catch_up(records, Path(tmp), args.durability, link, round_))
    base = best["ipc"]
    print(
        f"records={args.records} durability={args.durability} rounds={args.rounds} (payload "
        f"~{len(records[0])} bytes)"
    )
    for link in LINKS:
        print(
            f"monitor + router catch-up, {link:9s}: {best[link]:12,.0f} records/s  ({best[link] / base:.2f}x "
            f"ipc)"
        )


if __name__ == "__main__":
    main()
