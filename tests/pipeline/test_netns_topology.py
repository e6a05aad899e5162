"""Several nodes for real: 3 front nodes -> 1 middle tier -> store + fanout, each in its own network
namespace, every link tcp:// with CURVE, under resending devices and faults.

::

    f1, f2, f3 (web + monitor, own data dir)  ──tcp/CURVE──►  mid (router, publisher)
                                                                    │ tcp/CURVE
                                                                    ▼
                                                              sto (store, fanout)

All on one bridge in private namespaces (``bench/netns.py``, subnet 10.213.0.0/24
inside them only).  Faults, in turn: SIGKILL of every process kind on every host
(restarted at once); each cut link (front node, middle tier, store host) for longer
than every timeout; loss and delay on the middle tier's link.  At the end every
acked ``(device, seq)`` is stored, nothing unsent is, each device's rows are in seq
order, and every front node's ingress ring is drained.

Needs root and iproute2: without them the test FAILS (set ``IOTNODE_NETNS_OPTOUT=1``
to skip it explicitly).  ``IOTNODE_NETNS_SOAK_SECONDS=N`` repeats the fault rounds
for N seconds (default: one round, about 1.5 minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from bench.netns import OPT_OUT, Topology, unavailable
from node.curve import CLIENT, SERVER, load_keypair
from node.ring import Ring
from tests.support import REPO, Processes, node_env, wait_until

FRONTS = ("f1", "f2", "f3")
DEVICES = 8  # per front node
RATE = 20.0  # messages per second per device
CUT_SECONDS = 10.0  # > every timeout: ZMTP heartbeat 6 s, monitor ack timeout ceiling 8 s
IMPAIR_SECONDS = 8.0
SETTLE = 60.0  # s: longest wait for the pipeline to store everything at the end
ROUTER, PUB, REPLAY = 5555, 5556, 5557


def soak_seconds() -> float:
    raw = os.environ.get("IOTNODE_NETNS_SOAK_SECONDS", "0")
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise AssertionError(f"IOTNODE_NETNS_SOAK_SECONDS={raw!r}: expected a number of seconds") from None


@pytest.fixture
def topology() -> Iterator[Topology]:
    why = unavailable()
    if why is not None:
        if os.environ.get(OPT_OUT) == "1":
            pytest.skip(f"network namespace tests: {why} ({OPT_OUT}=1)")
        pytest.fail(f"the network namespace topology test cannot run: {why}; set {OPT_OUT}=1 to skip it")
    topo = Topology()
    try:
        topo.create({"mid": 2, "sto": 3, "f1": 11, "f2": 12, "f3": 13})
        yield topo
    finally:
        topo.close()


class Cluster:
    """The node processes of every host, started inside their namespaces."""

    def __init__(self, topo: Topology, root: Path, processes: Processes) -> None:
        self.topo, self.root, self.processes = topo, root, processes
        self.dirs = {h: root / h for h in ("mid", "sto", *FRONTS)}
        for d in self.dirs.values():
            d.mkdir()
        clients, subscribers = root / "mid-clients", root / "mid-subscribers"
        clients.mkdir()
        subscribers.mkdir()
        # The key exchange an operator does (README, "Several nodes"):
        server_key = load_keypair(self.dirs["mid"], SERVER).public_path
        for host in FRONTS:
            shutil.copy(load_keypair(self.dirs[host], CLIENT).public_path, clients / f"{host}.key")
        shutil.copy(load_keypair(self.dirs["sto"], CLIENT).public_path, subscribers / "sto.key")
        mid = topo.hosts["mid"]
        common = {"NODE_WEB_WORKERS": "1", "NODE_LOG_LEVEL": "info"}
        self.env = {
            "mid": node_env(
                self.dirs["mid"],
                NODE_ROUTER_BIND=f"tcp://{mid}:{ROUTER}",
                NODE_CURVE_CLIENTS_DIR=clients,
                NODE_PUB_BIND=f"tcp://{mid}:{PUB}",
                NODE_REPLAY_BIND=f"tcp://{mid}:{REPLAY}",
                NODE_CURVE_SUBSCRIBERS_DIR=subscribers,
                **common,
            ),
            "sto": node_env(
                self.dirs["sto"],
                NODE_PUB_CONNECT=f"tcp://{mid}:{PUB}",
                NODE_REPLAY_CONNECT=f"tcp://{mid}:{REPLAY}",
                NODE_CURVE_PUBLISHER_KEY=server_key,
                **common,
            ),
        }
        for host in FRONTS:
            self.env[host] = node_env(
                self.dirs[host],
                NODE_ROUTER_CONNECT=f"tcp://{mid}:{ROUTER}",
                NODE_CURVE_SERVER_KEY=server_key,
                **common,
            )
        self.kinds = {"mid": ("router", "publisher"), "sto": ("store", "fanout")}
        self.kinds.update({h: ("web", "monitor") for h in FRONTS})

    def start(self, host: str, kind: str) -> None:
        self.processes.start(
            f"{host}-{kind}",
            f"node.workers.{kind}",
            self.env[host],
            self.root,
            prefix=self.topo.exec_prefix(host),
        )

    def start_all(self) -> None:
        for host, kinds in self.kinds.items():
            for kind in kinds:
                self.start(host, kind)

    def logs(self, *names: str) -> str:
        return "\n".join(f"--- {n}\n{self.processes.log(n)[-2500:]}" for n in names or self.processes.procs)


class Senders:
    """One resending device fleet per front node (``tests/pipeline/netns_sender.py``)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.out = {h: cluster.root / f"{h}-sent.json" for h in FRONTS}

    def start(self) -> None:
        for host in FRONTS:
            env = self.cluster.env[host]
            self.cluster.processes.start(
                f"{host}-devices",
                "tests.pipeline.netns_sender",
                env,
                self.cluster.root,
                args=[
                    f"ws://127.0.0.1:{env['NODE_WEB_PORT']}/v1/ingest",
                    env["NODE_JWT_SECRET"],
                    host,
                    str(DEVICES),
                    str(RATE),
                    str(self.out[host]),
                ],
                prefix=self.cluster.topo.exec_prefix(host),
            )

    def report(self, host: str) -> dict[str, object]:
        try:
            data: dict[str, object] = json.loads(self.out[host].read_text())
        except (OSError, ValueError):
            return {"acked": {}, "next": {}, "done": False}
        return data

    def acked_count(self) -> int:
        total = 0
        for host in FRONTS:
            acked = self.report(host)["acked"]
            assert isinstance(acked, dict)
            total += sum(len(v) for v in acked.values())
        return total

    def stop(self) -> None:
        import signal

        for host in FRONTS:
            self.cluster.processes.procs[f"{host}-devices"].send_signal(signal.SIGTERM)
        for host in FRONTS:
            proc = self.cluster.processes.procs[f"{host}-devices"]
            proc.wait(timeout=90)
            assert self.report(host)["done"], self.cluster.logs(f"{host}-devices")


def stored_rows(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    try:
        with closing(sqlite3.connect(path, timeout=10)) as db:
            return db.execute("SELECT device_id, seq FROM messages ORDER BY rowid").fetchall()
    except sqlite3.OperationalError:
        return []


def progress(senders: Senders, what: str, timeout: float = 30.0) -> None:
    """The devices get new acks (the pipeline moves) within ``timeout``."""
    before = senders.acked_count()
    wait_until(lambda: senders.acked_count() > before + 50, timeout, interval=0.2, what=f"acks after {what}")


def fault_round(cluster: Cluster, senders: Senders, log: list[str]) -> None:
    import signal

    for host, kinds in cluster.kinds.items():
        for kind in kinds:
            name = f"{host}-{kind}"
            cluster.processes.kill(name, signal.SIGKILL)
            time.sleep(0.3)
            cluster.start(host, kind)
            log.append(f"SIGKILL {name}")
            time.sleep(1.2)
    progress(senders, "the SIGKILL round")
    for host in ("f1", "mid", "sto"):
        cluster.topo.cut(host)
        time.sleep(CUT_SECONDS)
        cluster.topo.restore(host)
        log.append(f"link of {host} down {CUT_SECONDS:g}s")
        progress(senders, f"restoring the link of {host}")
    applied = cluster.topo.impair("mid")
    time.sleep(IMPAIR_SECONDS)
    cluster.topo.clear("mid")
    log.append(f"mid: {applied} for {IMPAIR_SECONDS:g}s")
    progress(senders, "the impairment")


def test_three_front_nodes_one_middle_tier_survive_kills_cuts_and_loss_storing_every_ack_once(
    topology: Topology, tmp_path: Path, processes: Processes
) -> None:
    assert sys.executable and REPO.exists()
    cluster = Cluster(topology, tmp_path, processes)
    cluster.start_all()
    for host in FRONTS:
        wait_until(
            lambda h=host: "connected to the router" in processes.log(f"{h}-monitor"),
            30,
            what=f"{host}'s monitor connected over CURVE",
        )
    senders = Senders(cluster)
    senders.start()
    progress(senders, "the start", timeout=40)
    faults: list[str] = []
    deadline = time.monotonic() + soak_seconds()
    for _ in range(1000):  # bounded; one round by default
        fault_round(cluster, senders, faults)
        if time.monotonic() >= deadline:
            break
    senders.stop()
    dead = [n for n, p in processes.procs.items() if not n.endswith("-devices") and p.poll() is not None]
    assert not dead, cluster.logs(*dead)

    acked: set[tuple[str, int]] = set()
    sent_next: dict[str, int] = {}
    for host in FRONTS:
        report = senders.report(host)
        for device, seqs in report["acked"].items():  # type: ignore[union-attr]
            acked.update((device, s) for s in seqs)
        sent_next.update(report["next"])  # type: ignore[arg-type]
    store = cluster.dirs["sto"] / "store.sqlite3"

    def all_stored() -> bool:
        return acked <= set(stored_rows(store))

    try:
        wait_until(all_stored, SETTLE, interval=0.5, what="every acked message stored")
    except AssertionError:
        missing = sorted(acked - set(stored_rows(store)))
        raise AssertionError(
            f"{len(missing)} of {len(acked)} acked messages not stored, e.g. {missing[:5]}; faults {faults}\n"
            + cluster.logs("mid-router", "mid-publisher", "sto-store", "f1-monitor")
        ) from None
    rows = stored_rows(store)
    assert len(rows) == len(set(rows)), "a (device, seq) stored twice"
    never_sent = [(d, s) for d, s in rows if d not in sent_next or s >= sent_next[d]]
    assert not never_sent, f"stored messages no device sent: {never_sent[:5]}"
    last: dict[str, int] = {}
    for device, seq in rows:
        assert seq > last.get(device, -1), f"{device}: seq {seq} stored after {last[device]}"
        last[device] = seq
    for host in FRONTS:
        path = cluster.dirs[host] / "ingress.ring"

        def drained(p: Path = path) -> bool:
            ring = Ring.open(p, capacity=4 << 20, durability="process")
            try:
                return ring.head == ring.tail
            finally:
                ring.close()

        wait_until(drained, 30, interval=0.2, what=f"{host}'s ingress ring drained")
    print(
        f"\nnetns topology: {len(acked)} acked, {len(rows)} stored, {len(sent_next)} devices;"
        f" faults: {'; '.join(faults)}"
    )
