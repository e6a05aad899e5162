"""CURVE on the router's tcp:// link: real router and monitor processes, real sockets on 127.0.0.1.

The test process appends to ingress rings (as web fronts would), consumes the fan-in
ring (as the publisher would) and plays the attackers with its own ZeroMQ sockets.
Key files are made by ``python -m node.curve`` or by the processes themselves.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from node import wire
from node.curve import (
    CLIENT,
    SERVER,
    KeyFileError,
    fingerprint,
    key_paths,
    load_keypair,
    parse_public_key,
    read_public_key,
    resolve_server_key,
)
from node.record import pack_record
from tests.pipeline.conftest import FaninConsumer, IngressProducer, Stages, check_delivery
from tests.pipeline.test_monitor_router import DUPLICATES_PER_ROUTER_CRASH, cpu_seconds, start_pair
from tests.support import REPO, Processes, free_port, node_env, wait_until

QUIET = 1.5  # seconds an attack is given to get something into the fan-in ring


@pytest.fixture
def sockets() -> Iterator[Callable[[int], zmq.Socket[bytes]]]:
    """Make test-side ZeroMQ sockets (LINGER 0); all are closed at teardown."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    made: list[zmq.Socket[bytes]] = []

    def make(kind: int) -> zmq.Socket[bytes]:
        sock = context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        made.append(sock)
        return sock

    try:
        yield make
    finally:
        for sock in made:
            sock.close(linger=0)
        context.term()


def keys_command(env: dict[str, str], role: str) -> dict[str, str]:
    """Run ``python -m node.curve ROLE`` as an operator would; its printed fields."""
    proc = subprocess.run(
        [sys.executable, "-m", "node.curve", role],
        env=env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    fields = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert set(fields) == {"public key file", "public key", "fingerprint"}, proc.stdout
    return fields


def router_node(stages: Callable[..., Stages], root: Path, **env: object) -> tuple[Stages, Path, str]:
    """A node whose router binds a tcp:// endpoint with CURVE: ``(stages, clients dir, endpoint)``."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    clients = root / "clients"
    clients.mkdir()
    return (
        stages(root / "node-a", NODE_ROUTER_BIND=endpoint, NODE_CURVE_CLIENTS_DIR=clients, **env),
        clients,
        endpoint,
    )


def forged_batch() -> list[bytes]:
    """A well-formed BATCH of a record no device sent (what an intruder would inject)."""
    record = pack_record("victim", 0, None, time.time(), {"forged": True})
    return wire.encode_batch(os.urandom(16), [0], 64, [record], start=0, base=0)


def fanin_stays_empty(consumer: FaninConsumer, seconds: float = QUIET) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert consumer.drain() == 0 and consumer.got == [], consumer.got[:5]
        time.sleep(0.05)
    assert consumer.ring.depth == 0


def intrude(
    sockets: Callable[[int], zmq.Socket[bytes]], endpoint: str, server_key: bytes
) -> dict[str, zmq.Socket[bytes]]:
    """Two DEALERs sending forged batches: one with a valid but unauthorized CURVE key (and the
    router's real public key), one without CURVE.  Their batches are queued, sent only if a
    handshake ever succeeds."""
    intruders: dict[str, zmq.Socket[bytes]] = {}
    unknown = sockets(zmq.DEALER)
    public, secret = zmq.curve_keypair()
    unknown.curve_secretkey, unknown.curve_publickey, unknown.curve_serverkey = secret, public, server_key
    intruders["unknown key"] = unknown
    intruders["no CURVE"] = sockets(zmq.DEALER)
    for sock in intruders.values():
        sock.connect(endpoint)
        for _ in range(3):
            sock.send_multipart(forged_batch(), zmq.NOBLOCK)
    return intruders


# --------------------------------------------------------------------- end to end
def test_front_node_authorized_while_the_router_runs_gets_every_record_through(
    stages: Callable[..., Stages], processes: Processes, tmp_path: Path
) -> None:
    # The operator's steps (docs/monitor-router.md): the router's public key file goes to
    # the front node; the front's monitor is refused until its curve_client.key is copied
    # into the router's clients dir, which the running router reads again.
    a, clients, endpoint = router_node(stages, tmp_path)
    server = keys_command(a.env, SERVER)
    b = stages(
        tmp_path / "node-b", NODE_ROUTER_CONNECT=endpoint, NODE_CURVE_SERVER_KEY=server["public key file"]
    )
    producer = IngressProducer(b.ingress_path, prefix="b")
    consumer = FaninConsumer(a.fanin_path)
    producer.append(2000)
    a.start("router")
    b.start("monitor", "-b")
    wait_until(
        lambda: "refused a CURVE client" in processes.log("router"), 15, what="router refusing the key"
    )
    wait_until(
        lambda: "refused the connection handshake" in processes.log("monitor-b"),
        15,
        what="monitor reporting the refusal",
    )
    fanin_stays_empty(consumer, 0.5)
    assert producer.ring.depth == 2000  # nothing popped: nothing was acked

    client_key = Path(b.data_dir) / "curve_client.key"
    assert fingerprint(read_public_key(client_key)) in processes.log("monitor-b")
    shutil.copy(client_key, clients / "node-b.key")
    consumer.until_distinct(2000, timeout=20)
    assert check_delivery(producer.sent, consumer.got) == 0, a.logs()
    assert "authorized client keys reloaded" in processes.log("router")

    # Idle over CURVE: no spinning (ZMTP heartbeats every 2 s, the ZAP thread blocks).
    time.sleep(1.0)
    pids = [processes.procs["router"].pid, processes.procs["monitor-b"].pid]
    before = sum(cpu_seconds(pid) for pid in pids)
    time.sleep(3.0)
    used = sum(cpu_seconds(pid) for pid in pids) - before
    assert used < 0.1, f"idle monitor + router over CURVE used {used:.2f}s of CPU in 3 s"
    # SIGTERM: the authenticator thread stops with the router, both exit 0.
    processes.kill("monitor-b", signal.SIGTERM)
    processes.kill("router", signal.SIGTERM)
    assert processes.procs["monitor-b"].returncode == 0 and processes.procs["router"].returncode == 0, (
        a.logs()
    )


def test_unknown_key_and_plain_dealers_cannot_inject_batches_and_the_router_keeps_serving(
    stages: Callable[..., Stages],
    processes: Processes,
    tmp_path: Path,
    sockets: Callable[[int], zmq.Socket[bytes]],
) -> None:
    a, clients, endpoint = router_node(stages, tmp_path)
    server = load_keypair(a.data_dir, SERVER)
    consumer = FaninConsumer(a.fanin_path)
    a.start("router")
    wait_until(lambda: "CURVE on" in processes.log("router"), 15, what="router bound with CURVE")

    intruders = intrude(sockets, endpoint, server.public)
    wait_until(
        lambda: "refused a CURVE client" in processes.log("router"), 10, what="router refusing the key"
    )
    wait_until(
        lambda: "peers without CURVE" in processes.log("router"), 10, what="router reporting the plain peer"
    )
    fanin_stays_empty(consumer)
    for name, sock in intruders.items():
        assert not sock.poll(0), f"{name}: the router answered"

    # The node's own monitor (trusted through the data dir) still gets through, and later
    # attempts change nothing.
    producer = IngressProducer(a.ingress_path)
    producer.append(3000)
    a.start("monitor")
    intrude(sockets, endpoint, server.public)
    consumer.until_distinct(3000, timeout=20)
    time.sleep(0.3)
    consumer.drain()
    assert all(dev != "victim" for dev, _ in consumer.got)
    assert check_delivery(producer.sent, consumer.got) == 0, a.logs()
    assert processes.procs["router"].poll() is None


def test_monitor_sends_nothing_to_an_impostor_router_and_keeps_its_records(
    stages: Callable[..., Stages],
    processes: Processes,
    tmp_path: Path,
    sockets: Callable[[int], zmq.Socket[bytes]],
) -> None:
    # Whoever takes over the router's address without its secret key gets no batch, and the
    # monitor pops nothing (its records stay for the real router).
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    genuine = load_keypair(tmp_path / "node-a", SERVER)
    b = stages(
        tmp_path / "node-b", NODE_ROUTER_CONNECT=endpoint, NODE_CURVE_SERVER_KEY=genuine.public.decode()
    )
    producer = IngressProducer(b.ingress_path, prefix="b")
    producer.append(500)
    impostor = sockets(zmq.ROUTER)
    public, secret = zmq.curve_keypair()
    impostor.curve_secretkey, impostor.curve_publickey, impostor.curve_server = secret, public, True
    impostor.bind(endpoint)
    b.start("monitor")
    wait_until(
        lambda: "refused the connection handshake" in processes.log("monitor"),
        15,
        what="monitor failing the handshake",
    )
    assert not impostor.poll(int(QUIET * 1000)), "the impostor received a message"
    assert producer.ring.depth == 500
    assert processes.procs["monitor"].poll() is None


def test_router_killed_over_curve_comes_back_with_its_key_and_loses_nothing(
    stages: Callable[..., Stages], processes: Processes, tmp_path: Path
) -> None:
    # The node's own monitor over tcp:// + CURVE (trusted through the data dir, no key
    # configured).  Records appended while the router is dead can only arrive through a
    # restarted router: it loads the same keypair, the monitor's new handshake succeeds.
    s, _, _ = router_node(stages, tmp_path)
    producer, consumer = start_pair(s)
    for _ in range(2):
        producer.append(3000)
        consumer.until_distinct(len(producer.sent))
        processes.kill("router", signal.SIGKILL)
        producer.append(3000)
        s.start("router")
    consumer.until_distinct(len(producer.sent))
    assert check_delivery(producer.sent, consumer.got) <= 2 * DUPLICATES_PER_ROUTER_CRASH, s.logs()
    wait_until(lambda: producer.ring.depth == 0, 10, what="ingress ring popped to empty")
    server = load_keypair(Path(s.data_dir).resolve(), SERVER)
    assert processes.log("router").count(f"server key fingerprint {server.fingerprint}") == 3
    assert processes.log("router").count("server key fingerprint") == 3
    assert processes.log("monitor").count("INFO node.monitor: connected to the router") == 3, s.logs()


def test_curve_off_runs_the_tcp_link_open_and_warns_on_both_sides(
    stages: Callable[..., Stages], processes: Processes, tmp_path: Path
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    a = stages(tmp_path / "node-a", NODE_ROUTER_BIND=endpoint, NODE_CURVE="off")
    b = stages(tmp_path / "node-b", NODE_ROUTER_CONNECT=endpoint, NODE_CURVE="off")
    producer = IngressProducer(b.ingress_path, prefix="b")
    consumer = FaninConsumer(a.fanin_path)
    producer.append(1000)
    a.start("router")
    b.start("monitor")
    consumer.until_distinct(1000)
    assert check_delivery(producer.sent, consumer.got) == 0
    for name in ("router", "monitor"):
        assert "WARNING" in processes.log(name) and "NODE_CURVE=off" in processes.log(name), processes.log(
            name
        )
    assert not list(Path(b.data_dir).glob("curve_*")), "no keys are made with NODE_CURVE=off"


# --------------------------------------------------------------------- secrets
def test_secret_key_files_are_0600_and_never_in_a_log_line(
    stages: Callable[..., Stages], processes: Processes, tmp_path: Path
) -> None:
    a, clients, endpoint = router_node(stages, tmp_path, NODE_LOG_LEVEL="debug")
    server = load_keypair(a.data_dir, SERVER)
    remote = load_keypair(tmp_path / "node-b", CLIENT)
    shutil.copy(remote.public_path, clients / "node-b.key")
    b = stages(
        tmp_path / "node-b",
        NODE_ROUTER_CONNECT=endpoint,
        NODE_CURVE_SERVER_KEY=server.public_path,
        NODE_LOG_LEVEL="debug",
    )
    pa, pb = IngressProducer(a.ingress_path, prefix="a"), IngressProducer(b.ingress_path, prefix="b")
    consumer = FaninConsumer(a.fanin_path)
    pa.append(500)
    pb.append(500)
    a.start("router")
    a.start("monitor", "-a")
    b.start("monitor", "-b")
    consumer.until_distinct(1000)
    assert check_delivery(pa.sent + pb.sent, consumer.got) == 0

    secrets_seen = []
    for data, role in ((a.data_dir, SERVER), (a.data_dir, CLIENT), (b.data_dir, CLIENT)):
        public_path, secret_path = key_paths(Path(data).resolve(), role)
        assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600, secret_path
        assert stat.S_IMODE(public_path.stat().st_mode) == 0o644, public_path
        secrets_seen.append(load_keypair(Path(data).resolve(), role).secret.decode())
        assert "secret-key" not in public_path.read_text()
    logs = {name: processes.log(name) for name in ("router", "monitor-a", "monitor-b")}
    assert "DEBUG" in logs["router"]  # the most talkative level was on
    for name, text in logs.items():
        for secret in secrets_seen:
            assert secret not in text, f"a secret key is in the {name} log"
    assert server.fingerprint in logs["router"] and remote.fingerprint in logs["monitor-b"]


def test_processes_starting_together_make_one_keypair(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from node.curve import load_keypair; "
        "print(load_keypair(Path(sys.argv[1]), 'server').public.decode())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], cwd=str(REPO), stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    outputs = {p.communicate(timeout=30)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outputs) == 1 and len(outputs.pop()) == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve_server.key", "curve_server.key_secret"]


# --------------------------------------------------------------------- misconfiguration
def _bad_clients_dir(root: Path) -> dict[str, object]:
    clients = root / "clients"
    clients.mkdir()
    (clients / "broken.key").write_text('curve\n    public-key = "too-short"\n')
    return {"NODE_ROUTER_BIND": f"tcp://127.0.0.1:{free_port()}", "NODE_CURVE_CLIENTS_DIR": clients}


def _readable_secret(root: Path) -> dict[str, object]:
    clients = root / "clients"
    clients.mkdir()
    _, secret_path = key_paths(root / "data", SERVER)
    load_keypair(root / "data", SERVER)
    secret_path.chmod(0o644)
    return {"NODE_ROUTER_BIND": f"tcp://127.0.0.1:{free_port()}", "NODE_CURVE_CLIENTS_DIR": clients}


@pytest.mark.parametrize(
    ("stage", "make_env", "expected"),
    [
        pytest.param(
            "router",
            lambda root: {"NODE_ROUTER_BIND": f"tcp://127.0.0.1:{free_port()}"},
            ["NODE_CURVE_CLIENTS_DIR='<unset>'", "NODE_CURVE=off"],
            id="router-without-clients-dir",
        ),
        pytest.param(
            "monitor",
            lambda root: {"NODE_ROUTER_CONNECT": f"tcp://127.0.0.1:{free_port()}"},
            ["NODE_CURVE_SERVER_KEY='<unset>'", "curve_server.key"],
            id="monitor-without-server-key",
        ),
        pytest.param(
            "monitor",
            lambda root: {
                "NODE_ROUTER_CONNECT": f"tcp://127.0.0.1:{free_port()}",
                "NODE_CURVE_SERVER_KEY": "not-a-key",
            },
            ["NODE_CURVE_SERVER_KEY='not-a-key'", "40-character Z85 key"],
            id="malformed-server-key",
        ),
        pytest.param(
            "router",
            _bad_clients_dir,
            ["NODE_CURVE_CLIENTS_DIR=", "broken.key", "40-character"],
            id="malformed-client-key-file",
        ),
        pytest.param(
            "router", _readable_secret, ["NODE_DATA_DIR=", "chmod 600"], id="secret-readable-by-others"
        ),
    ],
)
def test_curve_misconfiguration_exits_2_naming_the_variable(
    processes: Processes,
    tmp_path: Path,
    stage: str,
    make_env: Callable[[Path], dict[str, object]],
    expected: list[str],
) -> None:
    env = node_env(tmp_path / "data", **make_env(tmp_path))
    proc = processes.start(stage, f"node.workers.{stage}", env, tmp_path)
    assert proc.wait(timeout=30) == 2, processes.log(stage)
    for text in expected:
        assert text in processes.log(stage), processes.log(stage)


# --------------------------------------------------------------------- key text, no processes
def test_public_keys_are_40_z85_characters_and_errors_say_why(tmp_path: Path) -> None:
    public, secret = zmq.curve_keypair()
    assert parse_public_key(public.decode()) == public
    assert parse_public_key(f' "{public.decode()}" \n') == public
    with pytest.raises(KeyFileError, match="40-character Z85 key, got 39"):
        parse_public_key(public[:39])
    with pytest.raises(KeyFileError, match="Z85 alphabet"):
        parse_public_key("~" * 40)
    bare = tmp_path / "bare.key"
    bare.write_text(public.decode() + "\n")
    assert resolve_server_key(str(bare)) == public == resolve_server_key(public.decode())
    leaked = tmp_path / "leaked.key"
    leaked.write_text(
        f'curve\n    public-key = "{public.decode()}"\n    secret-key = "{secret.decode()[:-1]}"\n'
    )
    with pytest.raises(KeyFileError) as info:
        read_public_key(leaked)
    assert secret.decode()[:-1] not in str(info.value)  # a secret is never echoed
    with pytest.raises(KeyFileError, match="neither a key file nor a Z85 public key"):
        resolve_server_key(str(tmp_path / "missing.key"))
