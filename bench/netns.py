"""Private network namespaces for multi-node tests and benchmarks: one bridge, links to cut, impairments.

Everything lives inside namespaces this module creates and deletes: a bridge
namespace holding ``br0`` and the host-side ends of the veth pairs, and one
namespace per host with ``eth0`` in the private subnet :data:`SUBNET` (it exists
only inside these namespaces) and its own loopback.  Nothing is added to the
caller's namespace.  :meth:`Topology.close` kills whatever still runs inside the
namespaces (only processes the test started can be there) and deletes them; use
it in a ``finally``.

Impairment: ``tc netem`` (loss + delay) when the kernel has it; kernels without
``sch_netem`` (this CI machine's) get a ``tbf`` rate limit with a small queue
instead, which also drops (tail drop past the queue) and delays (queueing) packets.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

SUBNET = "10.213.0"  # /24, inside the namespaces only
OPT_OUT = "IOTNODE_NETNS_OPTOUT"  # "1": skip the namespace tests instead of failing


def unavailable() -> str | None:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "they need root (ip netns, veth, bridge)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "they need iproute2 (ip, tc)"
    return None


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass
class Topology:
    """Hosts ``name -> address`` on one bridge; namespaces are named ``iotn<tag>-<name>``."""

    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    hosts: dict[str, str] = field(default_factory=dict)
    impairment: str = ""  # what :meth:`impair` applied, for the report
    _made: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"iotn{self.tag}-br"

    def ns(self, host: str) -> str:
        return f"iotn{self.tag}-{host}"

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def create(self, hosts: dict[str, int]) -> None:
        """``hosts``: name -> last octet of its address in :data:`SUBNET`."""
        run("ip", "netns", "add", self.bridge)
        self._made.append(self.bridge)
        run("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.bridge, "link", "set", "br0", "up")
        for host, octet in hosts.items():
            ns = self.ns(host)
            run("ip", "netns", "add", ns)
            self._made.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            port = self.port(host)
            run(
                "ip",
                "-n",
                self.bridge,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            run("ip", "-n", self.bridge, "link", "set", port, "master", "br0", "up")
            address = f"{SUBNET}.{octet}"
            run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            self.hosts[host] = address

    def port(self, host: str) -> str:
        return f"v-{host}"[:15]

    def cut(self, host: str) -> None:
        """Take the host's link down at the bridge (its own eth0 stays up: no local error)."""
        run("ip", "-n", self.bridge, "link", "set", self.port(host), "down")

    def restore(self, host: str) -> None:
        run("ip", "-n", self.bridge, "link", "set", self.port(host), "up")

    def impair(self, host: str) -> str:
        """Loss and delay on the host's egress; returns what was applied."""
        ns = self.ns(host)
        netem = run(
            "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root",
            "netem", "loss", "5%", "delay", "30ms", "10ms",
            check=False,
        )  # fmt: skip
        if netem.returncode == 0:
            self.impairment = "netem loss 5% delay 30ms±10ms"
        else:
            run(
                "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root",
                "tbf", "rate", "2mbit", "burst", "16kb", "limit", "24kb",
            )  # fmt: skip
            self.impairment = "tbf 2 Mbit/s, 24 kB queue (tail drops + queueing delay; no sch_netem)"
        return self.impairment

    def clear(self, host: str) -> None:
        run("ip", "netns", "exec", self.ns(host), "tc", "qdisc", "del", "dev", "eth0", "root", check=False)

    def pids(self) -> list[int]:
        out: list[int] = []
        for ns in self._made:
            proc = run("ip", "netns", "pids", ns, check=False)
            out.extend(int(p) for p in proc.stdout.split() if p.isdigit())
        return out

    def close(self) -> None:
        """Kill what still runs in the namespaces, delete them (bounded, never raises)."""
        for _ in range(5):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        for ns in reversed(self._made):
            try:
                run("ip", "netns", "del", ns, check=False)
            except (OSError, subprocess.SubprocessError):
                pass
        self._made.clear()
