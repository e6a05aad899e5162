"""node.metrics.serve: a stage's /metrics server sleeps between scrapes (issue 16) and stops on close()."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

from node import metrics


def _switches(tid: int) -> int:
    status = Path(f"/proc/self/task/{tid}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def test_the_metrics_thread_blocks_until_a_scrape_and_close_ends_it() -> None:
    before_threads = set(threading.enumerate())
    server = metrics.serve(0, "127.0.0.1")
    (thread,) = [t for t in threading.enumerate() if t not in before_threads and t.name == "iotnode-metrics"]
    port = server.server_address[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200 and b"# HELP" in resp.read()
    assert thread.native_id is not None
    time.sleep(0.2)
    before = _switches(thread.native_id)
    time.sleep(2.0)
    woke = _switches(thread.native_id) - before
    assert woke <= 1, f"the idle /metrics thread woke {woke} times in 2 s (serve_forever's poll: 4)"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        assert resp.status == 200  # still serving after the quiet spell
    t0 = time.monotonic()
    server.shutdown()  # = close(): serve_forever, which BaseServer.shutdown waits for, never ran
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - t0 < 1.0
    server.server_close()
