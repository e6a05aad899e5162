"""One load-generator process: many device connections over picows on uvloop.

Started by :mod:`bench.runner` as ``python -m bench.loadgen`` with a JSON spec on
stdin's first line.  It talks JSON lines: to stdout ``{"type": "connected"}`` after
the ramp, then ``{"type": "tick"}`` once a second, then ``{"type": "result"}``; from
stdin it reads ``{"go": <unix start time>}`` (all generators start together).

Open loop (``mode="rate"``): message *m* of connection *i* is scheduled at
``start + phase_i + m / rate``; its latency is measured from that scheduled time,
not from when it was actually written, so a stalled server or a late generator
shows up in the percentiles instead of silently lowering the offered load
(coordinated omission).  Messages that cannot be written (window full, socket
paused) wait in a backlog with their scheduled time.

Closed loop (``mode="max"``): every connection keeps ``window`` messages in flight;
latency is measured from the actual send.

Acks are cumulative: ``{"ack": N}`` resolves every message with ``seq <= N`` on that
connection, each with its own latency.  For MQTT, PUBACKs come in PUBLISH order, so
a PUBACK resolves every earlier packet the same way.
"""

from __future__ import annotations

import asyncio
import gc
import json
import resource
import socket
import sys
import time
from collections import deque
from typing import Any

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench import proto
from bench.hist import Histogram

_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
MAX_RECONNECTS = 5  # per connection per run
TICK = 0.002  # target scheduling granularity of the open loop, seconds


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def raise_nofile_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class GcWatch:
    """This process's cyclic-GC pauses per generation while the load runs: a full
    collection over 5,000 connections' objects stalls the generator's loop, which the
    open-loop latencies would otherwise charge to the target."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total = [0.0, 0.0, 0.0]
        self.max = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        took = time.perf_counter() - self._t0
        g = info["generation"]
        self.count[g] += 1
        self.total[g] += took
        self.max[g] = max(self.max[g], took)

    def to_json(self) -> dict[str, list[float]]:
        return {
            "collections": list(self.count),
            "total_ms": [round(t * 1e3, 2) for t in self.total],
            "max_ms": [round(t * 1e3, 2) for t in self.max],
        }


class Gen:
    """State shared by the connections of this process."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.kind: str = spec["kind"]  # "iotnode" | "mqtt"
        self.encoding: str = spec.get("encoding", "msgpack")
        self.binary = self.encoding == "msgpack" or self.kind == "mqtt"
        self.msg_type = WSMsgType.BINARY if self.binary else WSMsgType.TEXT
        self.data = proto.make_data(int(spec.get("payload", 64)))
        self.window: int = int(spec.get("window", 1000))
        self.mode: str = spec["mode"]
        # Device time ``ts`` in whole, strictly increasing milliseconds per connection: a
        # store that keeps one sample per series and millisecond (VictoriaMetrics with
        # -dedup.minScrapeInterval=1ms) then holds every message (bench e2e --sinks).
        self.distinct_ts = bool(spec.get("distinct_ts", False))
        self.lat = Histogram()  # interval histogram, merged into total each tick
        self.total = Histogram()
        self.connect_hist = Histogram()
        self.sent = 0
        self.acked = 0
        self.ack_frames = 0  # replies that acked something (< acked when acks are coalesced)
        self.errors = 0
        self.error_samples: list[str] = []
        self.reconnects = 0
        self.connect_failures = 0
        self.disconnects = 0
        self.running = False
        self.ending = False
        self.conns: list[Conn] = []
        self.lag = 0.0  # how late the pacing loop ran behind its schedule, max this interval (s)
        self.max_lag = 0.0

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(what)


class Conn(WSListener):
    def __init__(self, gen: Gen, index: int, device_id: str, token: str, source: str) -> None:
        self.gen = gen
        self.index = index
        self.device_id = device_id
        self.topic = f"bench/{device_id}".encode()
        self.token = token
        self.source = source
        self.transport: WSTransport | None = None
        self.ready = False
        self.paused = False
        self.next_seq = 0
        self.inflight: deque[tuple[int, float]] = deque()  # (seq, scheduled time)
        self.backlog: deque[float] = deque()  # scheduled times not yet written
        self.resend: deque[tuple[int, float]] = deque()  # unacked at a disconnect
        self.mqtt = proto.MqttParser() if gen.kind == "mqtt" else None
        self.connected_evt: asyncio.Event = asyncio.Event()
        self.reconnects = 0
        self.last_ms = 0  # distinct_ts: the last ts written, in ms

    # ------------------------------------------------------------------ picows
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if self.mqtt is not None:
            transport.send(WSMsgType.BINARY, proto.mqtt_connect(self.device_id, keepalive=600))
        else:
            self._became_ready()

    def _became_ready(self) -> None:
        self.ready = True
        self.connected_evt.set()
        if self.resend:  # protocol: resend every unacked message after a reconnect
            pending = self.resend
            self.resend = deque()
            for seq, sched in pending:
                self._write(seq, sched)
        self.pump()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        mt = frame.msg_type
        gen = self.gen
        if mt == WSMsgType.CLOSE:
            code = frame.get_close_code()
            if not gen.ending:
                gen.error(f"{self.device_id}: closed by server with code {int(code)}")
            # picows leaves the closing handshake to us: answer, then drop the socket.
            self.ready = False
            transport.send_close(code)
            transport.disconnect()
            return
        if self.mqtt is not None:
            if mt != WSMsgType.BINARY and mt != WSMsgType.CONTINUATION:
                return
            for ptype, body in self.mqtt.feed(frame.get_payload_as_bytes()):
                if ptype == proto.MQTT_PUBACK:
                    self.resolve(int.from_bytes(body[:2], "big"), mqtt=True)
                elif ptype == proto.MQTT_CONNACK:
                    if len(body) >= 2 and body[1] == 0:
                        self._became_ready()
                    else:
                        gen.error(f"MQTT CONNACK refused: {body!r}")
            return
        if mt == WSMsgType.BINARY or mt == WSMsgType.TEXT:
            reply = proto.decode_reply(frame.get_payload_as_bytes(), mt == WSMsgType.BINARY)
            if reply.ack is not None:
                self.resolve(reply.ack)
            else:
                gen.error(f"{self.device_id}: {reply.error} (seq {reply.seq})")
                if reply.seq is not None:
                    self.reject(reply.seq)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.ready = False
        self.transport = None
        gen = self.gen
        if gen.ending:
            return
        gen.disconnects += 1
        # Unacked messages are resent after reconnecting, with their original schedule.
        self.resend.extend(self.inflight)
        self.inflight.clear()
        if gen.running and self.reconnects < MAX_RECONNECTS:
            self.reconnects += 1
            gen.reconnects += 1
            asyncio.get_running_loop().create_task(_reconnect(self))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.pump()

    # ------------------------------------------------------------------ sending
    def _ts(self) -> float:
        if not self.gen.distinct_ts:
            return time.time()
        ms = max(int(time.time() * 1000), self.last_ms + 1)
        self.last_ms = ms
        return ms / 1000

    def _write(self, seq: int, sched: float) -> None:
        gen = self.gen
        if self.mqtt is not None:
            body = proto.encode_message("msgpack", seq, self._ts(), gen.data)
            pkt = proto.mqtt_publish_qos1(self.topic, seq % 0xFFFF + 1, body)
            self.transport.send(WSMsgType.BINARY, pkt)  # type: ignore[union-attr]
        else:
            self.transport.send(  # type: ignore[union-attr]
                gen.msg_type, proto.encode_message(gen.encoding, seq, self._ts(), gen.data)
            )
        self.inflight.append((seq, sched))
        gen.sent += 1

    def offer(self, sched: float) -> None:
        """Open loop: a message is due at ``sched``; write it now or queue it."""
        if self.ready and not self.paused and not self.backlog and len(self.inflight) < self.gen.window:
            seq = self.next_seq
            self.next_seq = seq + 1
            self._write(seq, sched)
        else:
            self.backlog.append(sched)

    def pump(self) -> None:
        """Write what the window allows: the backlog (open loop) or new messages (closed loop)."""
        if not self.ready or self.paused:
            return
        gen = self.gen
        room = gen.window - len(self.inflight)
        if gen.mode == "max":
            if not gen.running:
                return
            now = time.monotonic()
            while room > 0:
                seq = self.next_seq
                self.next_seq = seq + 1
                self._write(seq, now)
                room -= 1
            return
        backlog = self.backlog
        while room > 0 and backlog:
            seq = self.next_seq
            self.next_seq = seq + 1
            self._write(seq, backlog.popleft())
            room -= 1

    def reject(self, seq: int) -> None:
        """The target refused message ``seq``: it will never be acked; stop waiting for it."""
        for k, (s, _) in enumerate(self.inflight):
            if s == seq:
                del self.inflight[k]
                break
            if s > seq:
                break
        if self.backlog:
            self.pump()

    def resolve(self, ack: int, mqtt: bool = False) -> None:
        now = time.monotonic()
        inflight = self.inflight
        gen = self.gen
        lat = gen.lat
        n = 0
        if mqtt:
            # PUBACKs come in PUBLISH order: pop up to and including this packet id.
            while inflight:
                seq, sched = inflight.popleft()
                lat.record_us(int((now - sched) * 1e6))
                n += 1
                if seq % 0xFFFF + 1 == ack:
                    break
        else:
            while inflight and inflight[0][0] <= ack:
                seq, sched = inflight.popleft()
                lat.record_us(int((now - sched) * 1e6))
                n += 1
        gen.acked += n
        if n:
            gen.ack_frames += 1
        if self.backlog or gen.mode == "max":
            self.pump()


async def _open(conn: Conn, spec: dict[str, Any]) -> None:
    gen = conn.gen
    url = spec["url"]
    headers = {"Authorization": f"Bearer {conn.token}"} if conn.token else {}
    if gen.kind == "mqtt":
        headers["Sec-WebSocket-Protocol"] = "mqtt"

    def sock_factory(_parsed: Any) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((conn.source, 0))
        return s

    t0 = time.monotonic()
    await ws_connect(
        lambda: conn,
        url,
        extra_headers=headers,
        socket_factory=sock_factory,
        websocket_handshake_timeout=30,
        enable_auto_pong=True,
        max_frame_size=1 << 20,
    )
    if gen.kind == "mqtt":
        await asyncio.wait_for(conn.connected_evt.wait(), 30)
    gen.connect_hist.record(time.monotonic() - t0)


async def _reconnect(conn: Conn) -> None:
    await asyncio.sleep(0.2 * conn.reconnects)
    try:
        await _open(conn, conn.gen.spec)
    except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
        conn.gen.error(f"{conn.device_id}: reconnect failed: {exc!r:.200}")


async def _ramp(gen: Gen, spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    ramp = float(spec["ramp"])  # connections per second, this process
    sem = asyncio.Semaphore(int(spec.get("concurrency", 256)))
    t0 = loop.time()
    tasks = []

    async def one(c: Conn) -> None:
        async with sem:
            for attempt in range(3):
                try:
                    await _open(c, spec)
                    return
                except Exception as exc:  # noqa: BLE001 - counted, retried, reported
                    if attempt == 2:
                        gen.connect_failures += 1
                        gen.error(f"{c.device_id}: connect failed: {exc!r:.200}")
                    else:
                        await asyncio.sleep(0.1 * (attempt + 1))

    for k, c in enumerate(gen.conns):
        due = t0 + k / ramp
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(c)))
    await asyncio.gather(*tasks)


def _slots(gen: Gen, rate: float) -> tuple[float, list[list[Conn]], int]:
    """Open-loop schedule: (tick, slots, messages per connection per tick).

    Rate <= 1/TICK per connection: the period is split into S slots and each
    connection (by its global index, so phases are spread over all generator
    processes) sends one message in its slot.  Faster: every tick, every connection
    sends ``rate * tick`` messages (kept exact by a running count).
    """
    period = 1.0 / rate
    if period >= TICK:
        nslots = max(1, round(period / TICK))
        tick = period / nslots
        slots: list[list[Conn]] = [[] for _ in range(nslots)]
        for c in gen.conns:
            slots[c.index % nslots].append(c)
        return tick, slots, 1
    return TICK, [gen.conns], 0


async def _pace(gen: Gen, start: float, end: float, rate: float) -> None:
    tick, slots, per = _slots(gen, rate)
    nslots = len(slots)
    j = 0
    while True:
        t_ideal = start + j * tick
        if t_ideal >= end:
            return
        now = time.monotonic()
        delay = t_ideal - now
        if delay > 0:
            await asyncio.sleep(delay)
        elif -delay > gen.lag:
            gen.lag = -delay
        if per:
            for c in slots[j % nslots]:
                c.offer(t_ideal)
        else:
            lo = int(j * tick * rate)
            hi = int((j + 1) * tick * rate)
            for m in range(lo, hi):
                sched = start + m / rate
                for c in slots[0]:
                    c.offer(sched)
        j += 1


async def _report(gen: Gen, t_start: float, until: asyncio.Event) -> None:
    last_sent = last_acked = last_err = 0
    k = 0
    while not until.is_set():
        k += 1
        due = t_start + k
        try:
            await asyncio.wait_for(until.wait(), max(0.0, due - time.monotonic()))
        except TimeoutError:
            pass
        interval = gen.lat
        gen.lat = Histogram()
        gen.max_lag = max(gen.max_lag, gen.lag)
        gen.total.merge(interval)
        _emit(
            {
                "type": "tick",
                "k": k,
                "t": round(time.monotonic() - t_start, 3),
                "lag_ms": round(gen.lag * 1000, 1),
                "sent": gen.sent - last_sent,
                "acked": gen.acked - last_acked,
                "errors": gen.errors - last_err,
                "open": sum(1 for c in gen.conns if c.ready),
                "backlog": sum(len(c.backlog) for c in gen.conns),
                "lat": interval.to_json(),
            }
        )
        last_sent, last_acked, last_err = gen.sent, gen.acked, gen.errors
        gen.lag = 0.0


async def run(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    nofile = raise_nofile_limit(len(spec["devices"]) + 64)
    gen = Gen(spec)
    sources = spec.get("sources") or ["127.0.0.1"]
    for index, device_id, token in spec["devices"]:
        gen.conns.append(Conn(gen, index, device_id, token, sources[index % len(sources)]))
    t_ramp = time.monotonic()
    await _ramp(gen, spec)
    ramp_s = time.monotonic() - t_ramp
    _emit(
        {
            "type": "connected",
            "open": sum(1 for c in gen.conns if c.ready),
            "failed": gen.connect_failures,
            "ramp_s": round(ramp_s, 3),
            "nofile": nofile,
        }
    )
    line = await loop.run_in_executor(None, sys.stdin.readline)
    go = json.loads(line)["go"]
    # Wall-clock start agreed by all generators → this process's monotonic clock.
    start = time.monotonic() + (go - time.time())
    duration = float(spec["duration"])
    end = start + duration
    delay = start - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    watch = GcWatch()
    gc.callbacks.append(watch)
    gen.running = True
    stop = asyncio.Event()
    reporter = loop.create_task(_report(gen, start, stop))
    if spec["mode"] == "rate":
        await _pace(gen, start, end, float(spec["rate"]))
    else:
        for c in gen.conns:
            c.pump()
        await asyncio.sleep(max(0.0, end - time.monotonic()))
    gen.running = False
    sent_in_window = gen.sent
    # Drain: wait for outstanding acks (bounded).
    drain_deadline = time.monotonic() + float(spec.get("drain", 5.0))
    while time.monotonic() < drain_deadline:
        if spec["mode"] == "max" or not any(c.inflight or c.backlog or c.resend for c in gen.conns):
            break
        await asyncio.sleep(0.02)
    if spec["mode"] == "max":
        # Closed loop: what is still in flight at the end is neither lost nor late.
        await asyncio.sleep(0)
    stop.set()
    await reporter
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    gc.callbacks.remove(watch)
    unacked = sum(len(c.inflight) + len(c.backlog) + len(c.resend) for c in gen.conns)
    gen.ending = True
    for c in gen.conns:
        t = c.transport
        if t is not None:
            sock = t.underlying_transport.get_extra_info("socket")
            try:
                # RST instead of FIN: leaves no TIME_WAIT to eat loopback ports.
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
            t.disconnect(graceful=False)
    _emit(
        {
            "type": "result",
            "sent": gen.sent,
            "sent_in_window": sent_in_window,
            "acked": gen.acked,
            "ack_frames": gen.ack_frames,
            "unacked": unacked if spec["mode"] == "rate" else 0,
            "in_flight_at_end": unacked if spec["mode"] == "max" else 0,
            "errors": gen.errors,
            "error_samples": gen.error_samples,
            "reconnects": gen.reconnects,
            "disconnects": gen.disconnects,
            "connect_failures": gen.connect_failures,
            "lat": gen.total.to_json(),
            "connect": gen.connect_hist.to_json(),
            "max_lag_ms": round(max(gen.max_lag, gen.lag) * 1000, 1),
            "cpu_s": round((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime), 3),
            "maxrss_kb": ru1.ru_maxrss,
            "gc": watch.to_json(),
        }
    )
    await asyncio.sleep(0.05)


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    uvloop.run(run(spec))


if __name__ == "__main__":
    main()
