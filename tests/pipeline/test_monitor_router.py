"""monitor + router as real processes between real ring files.

The test appends to the ingress ring itself (as the web front would) and is the
fan-in ring's consumer (as the publisher would).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import zmq

from node import wire
from node.config import Settings
from node.curve import CLIENT, SERVER, load_keypair
from node.procmetrics import read_process
from tests.pipeline.conftest import FaninConsumer, IngressProducer, Stages, check_delivery
from tests.support import Processes, free_port, wait_for_port, wait_until

# Records the router may have appended but not acked when it is killed: the window.
DUPLICATES_PER_ROUTER_CRASH = Settings.monitor_window * Settings.monitor_batch_records


def produce_in_background(
    producer: IngressProducer, total: int, chunk: int = 200, pause: float = 0.004
) -> threading.Thread:
    def run() -> None:
        for _ in range(total // chunk):
            producer.append(chunk)
            time.sleep(pause)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def start_pair(
    s: Stages,
    preload: int = 0,
    producer: IngressProducer | None = None,
    consumer: FaninConsumer | None = None,
) -> tuple[IngressProducer, FaninConsumer]:
    """The test as ingress producer (``preload`` records appended before the stages
    start) and fan-in consumer, with router and monitor running."""
    producer = producer or IngressProducer(s.ingress_path)
    consumer = consumer or FaninConsumer(s.fanin_path)
    if preload:
        producer.append(preload)
    s.start("router")
    s.start("monitor")
    return producer, consumer


def finish_stream(thread: threading.Thread, producer: IngressProducer, consumer: FaninConsumer) -> int:
    """Wait for the background producer, then for every record it sent; the duplicates."""
    thread.join(timeout=30)
    assert not thread.is_alive()
    consumer.until_distinct(len(producer.sent))
    return check_delivery(producer.sent, consumer.got)


def kill_twice_mid_stream(
    s: Stages, processes: Processes, victim: str, total: int = 40_000
) -> tuple[int, IngressProducer]:
    """SIGKILL ``victim`` at 1/4 and 1/2 of a streamed ``total`` and restart it;
    the duplicates once every record arrived, and the producer."""
    producer, consumer = start_pair(s)
    thread = produce_in_background(producer, total)
    for crash in range(2):
        consumer.until_distinct((crash + 1) * total // 4)
        processes.kill(victim, signal.SIGKILL)
        time.sleep(0.2)
        s.start(victim)
    return finish_stream(thread, producer, consumer), producer


def cpu_seconds(pid: int) -> float:
    sample = read_process(pid)
    assert sample is not None, f"process {pid} is gone"
    return sample[0]


def test_every_record_arrives_once_in_order_and_ingress_drains(stages: Callable[..., Stages]) -> None:
    s = stages()
    producer, consumer = start_pair(s, preload=20_000)
    consumer.until_distinct(20_000)
    assert check_delivery(producer.sent, consumer.got) == 0, s.logs()
    wait_until(lambda: producer.ring.depth == 0, 10, what="ingress ring popped to empty")


@pytest.mark.parametrize(
    ("victim", "most_duplicates"),
    [
        # the restarted router binds again over the socket file the killed one left
        # behind; what the dead one appended but had not acked comes again (<= a window)
        pytest.param("router", 2 * DUPLICATES_PER_ROUTER_CRASH, id="router-bounds-duplicates"),
        # the restarted monitor resends from the ring head; the live router drops what it has
        pytest.param("monitor", 0, id="monitor-duplicates-nothing"),
    ],
)
def test_sigkill_mid_stream_loses_nothing(
    stages: Callable[..., Stages], processes: Processes, victim: str, most_duplicates: int
) -> None:
    s = stages()
    duplicates, producer = kill_twice_mid_stream(s, processes, victim)
    assert duplicates <= most_duplicates, s.logs()
    wait_until(lambda: producer.ring.depth == 0, 10, what="ingress ring popped to empty")


def test_router_and_monitor_killed_together_lose_nothing(
    stages: Callable[..., Stages], processes: Processes
) -> None:
    # The router is frozen (SIGSTOP) while records arrive, so the monitor's window sits
    # in socket buffers; then both die: those batches are lost with the router and the
    # monitor cannot resend them.  Only records not popped before the ack survive this.
    s = stages()
    producer, consumer = start_pair(s)
    for _ in range(3):
        producer.append(5000)
        consumer.until_distinct(len(producer.sent))
        os.kill(processes.procs["router"].pid, signal.SIGSTOP)
        for _ in range(10):
            producer.append(100)
            time.sleep(0.02)  # the monitor sends its window towards the frozen router
        processes.kill("monitor", signal.SIGKILL)
        processes.kill("router", signal.SIGKILL)
        s.start("router")
        s.start("monitor")
    producer.append(1000)
    consumer.until_distinct(len(producer.sent))
    assert check_delivery(producer.sent, consumer.got) <= 3 * DUPLICATES_PER_ROUTER_CRASH, s.logs()


def test_full_fanin_ring_stops_ingress_draining_and_resumes_when_consumed(
    stages: Callable[..., Stages],
) -> None:
    fanin_bytes = 1 << 20
    s = stages(NODE_FANIN_RING_BYTES=fanin_bytes)
    producer, consumer = start_pair(
        s,
        preload=3000,
        producer=IngressProducer(s.ingress_path, pad=900),  # ~1 KiB records: 3 MiB into a 1 MiB fan-in ring
        consumer=FaninConsumer(s.fanin_path, capacity=fanin_bytes),
    )

    wait_until(lambda: producer.ring.depth < 3000, 20, what="the monitor to start draining")
    depths: list[int] = []

    def stalled() -> bool:
        depths.append(producer.ring.depth)
        return len(depths) > 25 and len(set(depths[-25:])) == 1  # unchanged for ~0.5 s

    wait_until(stalled, 20, interval=0.02, what="the ingress ring to stop draining")
    assert 0 < producer.ring.depth < 3000
    assert consumer.ring.depth > 0 and consumer.ring.bytes_used > fanin_bytes // 2
    wait_until(
        lambda: "fan-in ring full" in s.processes.log("router"), 5, what="router logging the full ring"
    )

    consumer.until_distinct(3000)
    assert check_delivery(producer.sent, consumer.got) == 0, s.logs()
    wait_until(lambda: producer.ring.depth == 0, 10, what="ingress ring drained after consuming")


def test_ingress_ring_wrapping_many_times_with_padding_loses_nothing(stages: Callable[..., Stages]) -> None:
    # ~800-byte records do not divide 1 MiB: every wrap leaves padding, sometimes right
    # after the last acked record (the ring may release it and move its head past it).
    ingress_bytes = 1 << 20
    s = stages(NODE_INGRESS_RING_BYTES=ingress_bytes)
    producer, consumer = start_pair(
        s, producer=IngressProducer(s.ingress_path, capacity=ingress_bytes, pad=700)
    )
    for _burst in range(45):  # ~3.5 laps of the ingress ring
        producer.append(97)
        consumer.until_distinct(len(producer.sent), timeout=15)
    # pops are paced (node/pipeline/pacer.py): the head follows within POP_INTERVAL
    wait_until(lambda: producer.ring.head > 3 * ingress_bytes, 5, what="the monitor to pop ~3.5 laps")
    assert check_delivery(producer.sent, consumer.got) == 0, s.logs()


def test_two_monitors_feed_one_router_over_tcp(stages: Callable[..., Stages], tmp_path: Path) -> None:
    # CURVE on (the default): node-b's monitor is listed in the router's clients dir and
    # knows the router's public key file; node-a's own monitor needs neither.
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    clients = tmp_path / "clients"
    clients.mkdir()
    server = load_keypair(tmp_path / "node-a", SERVER)
    shutil.copy(load_keypair(tmp_path / "node-b", CLIENT).public_path, clients / "node-b.key")
    a = stages(tmp_path / "node-a", NODE_ROUTER_BIND=endpoint, NODE_CURVE_CLIENTS_DIR=clients)
    b = stages(tmp_path / "node-b", NODE_ROUTER_CONNECT=endpoint, NODE_CURVE_SERVER_KEY=server.public_path)
    producer_a = IngressProducer(a.ingress_path, prefix="a")
    producer_b = IngressProducer(b.ingress_path, prefix="b")
    consumer = FaninConsumer(a.fanin_path)
    a.start("router")
    a.start("monitor", "-a")
    b.start("monitor", "-b")
    for _ in range(10):
        producer_a.append(1000)
        producer_b.append(1000)
    consumer.until_distinct(20_000)
    assert check_delivery(producer_a.sent + producer_b.sent, consumer.got) == 0, a.logs()
    wait_until(
        lambda: producer_a.ring.depth == 0 and producer_b.ring.depth == 0, 10, what="both rings popped"
    )


def test_sigterm_exits_0_and_a_restart_resumes_exactly_once(
    stages: Callable[..., Stages], processes: Processes
) -> None:
    s = stages()
    producer, consumer = start_pair(s)
    total = 30_000
    thread = produce_in_background(producer, total)
    consumer.until_distinct(total // 3)
    processes.kill("monitor", signal.SIGTERM)
    processes.kill("router", signal.SIGTERM)
    assert processes.procs["monitor"].returncode == 0, s.logs()
    assert processes.procs["router"].returncode == 0, s.logs()
    start_pair(s, producer=producer, consumer=consumer)
    assert finish_stream(thread, producer, consumer) == 0, s.logs()
    assert len(producer.sent) == total


def test_second_router_on_a_live_ipc_endpoint_exits_2(
    stages: Callable[..., Stages], processes: Processes
) -> None:
    s = stages()
    s.start("router")
    wait_until(lambda: (s.data_dir / "router.sock").exists(), 10, what="the router socket file")
    s.env["NODE_METRICS_PORT_ROUTER"] = str(free_port())
    s.start("router", "-2")
    assert processes.procs["router-2"].wait(timeout=15) == 2
    assert "another process is serving" in processes.log("router-2")
    assert processes.procs["router"].poll() is None  # the first one keeps its endpoint


def test_second_monitor_on_the_same_ingress_ring_exits_2(
    stages: Callable[..., Stages], processes: Processes
) -> None:
    s = stages()
    s.start("router")
    s.start("monitor")
    wait_until(
        lambda: "forwarding ingress ring" in processes.log("monitor"), 15, what="first monitor consuming"
    )
    s.env["NODE_METRICS_PORT_MONITOR"] = str(free_port())
    s.start("monitor", "-2")
    assert processes.procs["monitor-2"].wait(timeout=15) == 2
    assert "already has a consumer" in processes.log("monitor-2")
    assert processes.procs["monitor"].poll() is None


def test_bad_endpoint_configuration_exits_2_naming_the_variable(
    stages: Callable[..., Stages], processes: Processes
) -> None:
    s = stages(NODE_ROUTER_BIND="udp://127.0.0.1:1")
    s.start("router")
    s.start("monitor")
    for name in ("router", "monitor"):
        assert processes.procs[name].wait(timeout=15) == 2
        assert "NODE_ROUTER_BIND='udp://127.0.0.1:1'" in processes.log(name)


def test_metrics_show_ingress_depth_and_stage_counters(stages: Callable[..., Stages]) -> None:
    s = stages()
    producer, consumer = start_pair(s, preload=1000)
    consumer.until_distinct(1000)
    monitor_port = int(s.env["NODE_METRICS_PORT_MONITOR"])
    router_port = int(s.env["NODE_METRICS_PORT_ROUTER"])
    wait_for_port(monitor_port)
    wait_for_port(router_port)

    def scraped() -> bool:
        mon = httpx.get(f"http://127.0.0.1:{monitor_port}/metrics").text
        rou = httpx.get(f"http://127.0.0.1:{router_port}/metrics").text
        return (
            'iotnode_ring_depth{ring="ingress"} 0.0' in mon
            and 'iotnode_messages_total{stage="forwarded"} 1000.0' in mon
            and 'iotnode_messages_total{stage="routed"} 1000.0' in rou
        )

    wait_until(scraped, 10, interval=0.1, what="metrics to show the 1000 records")


def test_idle_monitor_and_router_do_not_spin(stages: Callable[..., Stages], processes: Processes) -> None:
    s = stages()
    s.start("router")
    s.start("monitor")
    wait_until(lambda: "connected to the router" in processes.log("monitor"), 15, what="monitor connected")
    time.sleep(1.0)
    pids = [processes.procs["router"].pid, processes.procs["monitor"].pid]
    before = sum(cpu_seconds(p) for p in pids)
    time.sleep(3.0)
    used = sum(cpu_seconds(p) for p in pids) - before
    assert used < 0.06, f"idle monitor + router used {used:.2f}s of CPU in 3 s"


def test_monitor_batch_size_window_and_ack_timeout_come_from_configuration(
    stages: Callable[..., Stages], processes: Processes
) -> None:
    # The test is the router: a real ROUTER socket on the monitor's endpoint that
    # acks only when told to, so the monitor's batches and resends are seen as sent.
    s = stages(
        NODE_MONITOR_BATCH_RECORDS=5,
        NODE_MONITOR_WINDOW=3,
        NODE_MONITOR_ACK_TIMEOUT=0.2,
        NODE_MONITOR_ACK_TIMEOUT_MAX=0.2,
    )
    producer = IngressProducer(s.ingress_path)
    producer.append(60)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(f"ipc://{s.data_dir.resolve() / 'router.sock'}")
        s.start("monitor")

        def receive(timeout: float) -> tuple[bytes, wire.Batch] | None:
            if not sock.poll(int(timeout * 1000)):
                return None
            identity, *body = sock.recv_multipart()
            return identity, wire.decode_batch(body)

        # Not acked: exactly the window (3 batches of 5 records), resent every 0.2 s.
        seen: list[wire.Batch] = []
        deadline = time.monotonic() + 1.5
        got = receive(15)
        assert got is not None, s.logs()
        identity = got[0]
        while got is not None and time.monotonic() < deadline:
            seen.append(got[1])
            got = receive(max(0.0, deadline - time.monotonic()))
        spans = sorted({(b.start, b.end) for b in seen})
        assert len(spans) == 3 and all(len(b.records) == 5 for b in seen), spans
        assert spans[0][1] == spans[1][0] and spans[1][1] == spans[2][0]  # contiguous
        copies_of_first = sum(1 for b in seen if (b.start, b.end) == spans[0])
        # 1 s then 2 s (the defaults) would allow 2 copies in 1.5 s; 0.2 s allows ~7
        assert copies_of_first >= 3, f"{copies_of_first} copies of the first batch in 1.5 s"
        assert producer.ring.depth == 60  # nothing acked, nothing popped

        # Acking batch by batch moves the window on 5 records at a time until all 60 are acked.
        ring_id, acked = seen[0].ring, spans[-1][1]
        sock.send_multipart([identity, *wire.encode_ack(ring_id, acked)])
        new_spans: set[tuple[int, int]] = set()
        deadline = time.monotonic() + 20
        while len(new_spans) < 60 // 5 - 3 and time.monotonic() < deadline:
            got = receive(1)
            if got is None or got[1].end <= acked:
                continue  # a resend of something acked already
            batch = got[1]
            assert len(batch.records) == 5 and batch.start == acked, (batch.start, acked)
            new_spans.add((batch.start, batch.end))
            acked = batch.end
            sock.send_multipart([identity, *wire.encode_ack(ring_id, acked)])
        assert len(new_spans) == 60 // 5 - 3, s.logs()
        wait_until(lambda: producer.ring.depth == 0, 10, what="the monitor to pop what was acked")
        assert "batches of <= 5 records" in processes.log("monitor") and "window 3" in processes.log(
            "monitor"
        )
    finally:
        sock.close(linger=0)
        ctx.term()
        producer.close()


def test_a_front_ring_restored_to_an_older_image_is_a_new_source_for_a_running_router(
    stages: Callable[..., Stages],
) -> None:
    """Issue 12, the cross-node loss: a router keeps its per-source dedup state while a
    front node's ingress ring comes back with a lower tail (an older image of the file,
    as a power cut could leave before the ring's fixes), and new records reuse the
    positions above it.  The monitor names its ring by the incarnation (ring id + the
    epoch that every recovery bumps): the router takes it for a new source and drops
    nothing.  Keyed by the ring id alone, it acked them as duplicates and they were lost."""
    s = stages()
    s.start("router")
    s.start("monitor")
    producer = IngressProducer(s.ingress_path, pad=200)
    consumer = FaninConsumer(s.fanin_path)
    try:
        producer.append(50)
        consumer.until_distinct(50)
        image = s.ingress_path.read_bytes()  # the ring with 50 records appended
        producer.append(50)
        consumer.until_distinct(100)  # the router's dedup state now says "known up to record 100"
        s.processes.kill("monitor")
        producer.close()
        s.ingress_path.write_bytes(image)  # the front node boots on an older image
        s.start("monitor", "-2")  # recovers the ring alone: a new epoch
        wait_until(lambda: "forwarding ingress ring" in s.processes.log("monitor-2"), 15, what="the monitor")
        late = IngressProducer(s.ingress_path, pad=200, prefix="late")
        late.append(50)  # at positions the router already saw for the old incarnation
        want = set(late.sent)
        wait_until(
            lambda: consumer.drain() >= 0 and want <= set(consumer.got),
            30,
            what="the late records downstream",
        )
        late.close()
    finally:
        consumer.close()
