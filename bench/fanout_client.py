"""A client app on the fanout stream, as one process: the receiving end of
:mod:`bench.e2e`.

``python -m bench.fanout_client`` reads a JSON spec on stdin's first line
(``{"url", "token", "prefix", "since"}``), connects (picows on uvloop, the same
client stack as :mod:`bench.loadgen`) to ``url?device=*`` and answers JSON lines on
stdout: ``{"type": "ready"}`` once connected, then, after a ``stop`` line on stdin,
``{"type": "result"}`` with the frame count and a latency histogram.

Latency of a frame is ``receive time - ts`` (unix seconds): the generator puts its
send time in each message's ``ts`` (:func:`bench.proto.encode_message`) and the node
carries it to the client unchanged (DESIGN.md contract 4).  ``node_lat`` is
``receive time - received_at`` (the web front's receive time, same clock): the
node's part, without the generator and the device socket.  Frames of other devices
(``device`` not starting with ``prefix``) or sent before ``since`` (a previous run
still draining) are counted apart, not measured.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.hist import Histogram


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Client(WSListener):
    def __init__(self, prefix: str, since: float) -> None:
        self.prefix = prefix
        self.since = since
        self.lat = Histogram()
        self.node_lat = Histogram()  # receive time - received_at: the node's part (web -> client)
        self.frames = 0  # measured frames
        self.other = 0  # frames of other devices or older runs
        self.bad = 0  # undecodable frames or without a numeric ts
        self.out_of_order = 0  # a device's seq not above its previous one
        self.last_seq: dict[str, int] = {}
        self.first_at = 0.0
        self.last_at = 0.0
        self.closed: str | None = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = time.time()
        if frame.msg_type == WSMsgType.CLOSE:
            code = frame.get_close_code()
            self.closed = f"closed by the fanout with code {code!r}"
            transport.send_close(code)
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        try:
            msg = json.loads(frame.get_payload_as_bytes())
            device, seq, ts = msg["device"], msg["seq"], float(msg["ts"])
            received_at = float(msg["received_at"])
        except (ValueError, KeyError, TypeError):
            self.bad += 1
            return
        if not str(device).startswith(self.prefix) or ts < self.since:
            self.other += 1
            return
        if seq <= self.last_seq.get(device, -1):
            self.out_of_order += 1
        self.last_seq[device] = seq
        self.lat.record_us(max(0, int((now - ts) * 1e6)))
        self.node_lat.record_us(max(0, int((now - received_at) * 1e6)))
        self.frames += 1
        if not self.first_at:
            self.first_at = now
        self.last_at = now

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.closed is None:
            self.closed = "disconnected"


async def run(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    client = Client(spec.get("prefix", ""), float(spec.get("since", 0.0)))
    url = spec["url"] + ("&" if "?" in spec["url"] else "?") + "device=*"
    transport, _ = await ws_connect(
        lambda: client,
        url,
        extra_headers={"Authorization": f"Bearer {spec['token']}"},
        websocket_handshake_timeout=30,
        enable_auto_pong=True,
        max_frame_size=1 << 24,
    )
    _emit({"type": "ready"})
    await loop.run_in_executor(None, sys.stdin.readline)  # "stop" (or EOF)
    _emit(
        {
            "type": "result",
            "frames": client.frames,
            "other": client.other,
            "bad": client.bad,
            "out_of_order": client.out_of_order,
            "devices": len(client.last_seq),
            "first_at": client.first_at,
            "last_at": client.last_at,
            "closed": client.closed,
            "lat": client.lat.to_json(),
            "node_lat": client.node_lat.to_json(),
        }
    )
    if client.closed is None:
        transport.disconnect(graceful=False)


def main() -> None:
    uvloop.run(run(json.loads(sys.stdin.readline())))


if __name__ == "__main__":
    main()
