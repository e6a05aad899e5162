"""VictoriaMetrics sink (``NODE_VM_URL``): Influx line protocol over HTTP ``/write``.

One point per row::

    <type>,device_id=D,type=T,class=C,region=R,geohash=G <field>=<number>,...,iotnode_seq=<seq> <time ms>

* measurement = the device type (characters outside ``[A-Za-z0-9_]`` become ``_``);
  VictoriaMetrics names the series ``<measurement>_<field>`` (``thermo_temp``).
* fields: the numeric values of ``data`` (an object; nested objects flattened
  with ``_``, ``{"gps": {"lat": 1}}`` -> ``gps_lat``; booleans as 0/1; a bare number
  is the field ``value``), plus ``iotnode_seq`` (the message's seq: one sample per
  message, so ``count_over_time(<type>_iotnode_seq[1m])`` counts messages).
  **Strings, lists and nulls are skipped** and counted in
  ``iotnode_sink_skipped_fields_total{sink="victoria"}``: a TSDB series holds numbers.
* tags with an empty value are left out (the line protocol has no empty tags);
  ``site``, ``lat``/``lon`` and labels are not tags (unbounded / per-device already).
* time: the device ``ts`` (unix seconds) when present and within a year of
  ``received_at``, else ``received_at``; millisecond precision.

**Exactly once.**  A rewritten batch writes the same series with the same
timestamps and values; VictoriaMetrics started with ``-dedup.minScrapeInterval=1ms``
keeps one sample per series and millisecond, so a rewrite stores nothing twice
(two messages of one device within the same millisecond also collapse into one
sample: give devices distinct ``ts``).  VictoriaMetrics has no transactions, so the
cursor cannot be committed with the samples: it is kept in
``NODE_DATA_DIR/victoria.cursor`` (with the URL it belongs to), written atomically
(temporary file, fsync, rename) *after* VictoriaMetrics acknowledged the batch.  A
crash in between rewrites that batch -- identically, unless the device registry
changed in that moment (then its rows land once more, in the series of the new
tags).  VictoriaMetrics acknowledges before its in-memory buffer reaches disk (about
a second), so after a lost connection (it may have been killed) the sink rewrites
the last ``REWIND_SECONDS`` of its writes.  (A first version kept the cursor as a
series in VictoriaMetrics; a restarted sink could not find the fresh series for a
while through ``/api/v1/export`` label filters, and rewrote everything.)

**One batch in flight.**  :meth:`VictoriaSink.write` formats its batch, then waits for the
previous batch's POST (sent from a background thread), commits it as above (cursor file,
``durable``), and sends the new one: VictoriaMetrics ingests a batch while the loop reads
and formats the next.  ``durable`` thus trails the rows handed over by one batch until
``idle()`` or ``flush()``; a POST that failed raises ``SinkDown`` at that point, commits
nothing, and the batch in hand is dropped (the loop reconnects and rewrites both).
**Formatting in C.**  :func:`batch_body` builds the body in ``_vmlines.c`` (built at install
like the ring's C helpers): it parses ``data`` itself and writes exactly the bytes of the Python
formatter :func:`batch_lines` (a hypothesis test compares them), handing the rows whose result
could differ -- escaped or repeated keys, integers beyond 18 digits, overflowing floats -- to
:func:`raw_line`.  The sink reads the store in columns (:func:`read_column_batch`, the C reader
of ``_storeread.c``), which ``format_columns`` formats without a Python object per row.
(Building the lines in SQLite, ``json_each`` and string concatenation in SQLite 3.40,
measured 8-90 us a row against Python's ≈ 5: docs/bench.md.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from orjson import JSONDecodeError
from orjson import loads as _orjson_loads

from node.metrics import SINK_SKIPPED_FIELDS, SINK_WRITE_SECONDS
from node.registry import DeviceContext, Registry
from node.storage.enrich import Batch, ColumnBatch, Row, read_column_batch
from node.storage.source import RawRow, StoreLog
from node.storage.tail import SinkDown, TailSink

try:
    from node.storage._vmlines import (  # type: ignore[import-not-found,import-untyped,unused-ignore]
        format_batch,
        format_columns,
    )
except ImportError as exc:  # pragma: no cover - a build problem, not a runtime path
    raise ImportError(
        f"the VictoriaMetrics sink's C formatter (node.storage._vmlines) is not built ({exc});"
        " run `pip install -e .` in the repository root"
    ) from exc

REWIND_SECONDS = 5.0  # s of writes rewritten after a reconnect (VictoriaMetrics' unflushed buffer)
log = logging.getLogger("node.storage.victoria")
_YEAR = 365 * 86400.0
_MAX_DEPTH = 3
_TIMEOUT = 10.0  # s per HTTP request

_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


_names: dict[str, str] = {}  # raw name -> metric_name(raw): field names repeat on every row
_NAMES_MAX = 65536


def metric_name(raw: str) -> str:
    """A measurement / field name VictoriaMetrics and PromQL take as is."""
    name = _names.get(raw)
    if name is None:
        out = "".join(c if c in _NAME_OK else "_" for c in raw) or "_"
        name = "_" + out if out[0].isdigit() else out
        if len(_names) < _NAMES_MAX:
            _names[raw] = name
    return name


def _tag(value: str) -> str:
    """A tag value in the line protocol, which has no escape for a line break: CR/LF (possible
    in a registry value) become escaped spaces."""
    value = value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")
    if "\n" in value or "\r" in value:
        value = value.replace("\n", "\\ ").replace("\r", "\\ ")
    return value


def _fields(data: Any, prefix: str, out: list[str], depth: int) -> int:
    """Append ``name=value`` for every number in ``data``; return how many values were skipped."""
    if isinstance(data, bool):
        out.append(f"{metric_name(prefix or 'value')}={int(data)}")
        return 0
    if isinstance(data, (int, float)):
        if isinstance(data, float) and not math.isfinite(data):
            return 1
        out.append(f"{metric_name(prefix or 'value')}={data!r}")
        return 0
    if isinstance(data, dict) and depth < _MAX_DEPTH:
        skipped = 0
        for key, value in data.items():
            skipped += _fields(value, f"{prefix}_{key}" if prefix else str(key), out, depth + 1)
        return skipped
    return 1  # string, list, null, or nested too deep


def _ms(ts: float | None, received_at: float) -> int:
    if ts is not None and math.isfinite(ts) and abs(ts - received_at) <= _YEAR:
        return round(ts * 1000)
    return round(received_at * 1000)


def sample_ms(row: Row) -> int:
    return _ms(row.ts, row.received_at)


def loads(text: str) -> Any:
    """``data``'s JSON text parsed: orjson (≈ 4x faster than ``json``), and ``json`` for what
    orjson refuses but the store may hold (integers beyond 64 bits, lone surrogate escapes)."""
    try:
        return _orjson_loads(text)
    except JSONDecodeError:
        return json.loads(text)


_keys: dict[str, str] = {}  # top-level key of data -> "<field name>=": the same keys on every row


def _key(key: str) -> str:
    name = _keys.get(key)
    if name is None:
        name = metric_name(key or "value") + "="
        if len(_keys) < _NAMES_MAX:
            _keys[key] = name
    return name


def _top_fields(data: Any, out: list[str]) -> int:
    """:func:`_fields` of a row's ``data`` (the same fields, in the same order), with the usual
    case -- an object of numbers -- in one loop: no call, no f-string per value."""
    if type(data) is not dict:
        return _fields(data, "", out, 0)
    skipped = 0
    keys = _keys
    for key, value in data.items():
        kind = type(value)
        if kind is float:
            if value - value == 0.0:  # finite (inf - inf and nan - nan are nan)
                out.append((keys.get(key) or _key(key)) + repr(value))
            else:
                skipped += 1
        elif kind is int:
            out.append((keys.get(key) or _key(key)) + str(value))
        elif kind is bool:
            out.append((keys.get(key) or _key(key)) + ("1" if value else "0"))
        elif kind is dict:
            skipped += _fields(value, key, out, 1)
        else:
            skipped += 1  # string, list, null
    return skipped


_prefixes: dict[str, tuple[object, str]] = {}  # device_id -> (its context, "measurement,tags")


def _prefix(device_id: str, ctx: DeviceContext) -> str:
    cached = _prefixes.get(device_id)
    if cached is not None and cached[0] is ctx:
        return cached[1]
    prefix = _line_prefix(device_id, ctx)  # first row of the device, or a new registry (a new context)
    if cached is not None or len(_prefixes) < _NAMES_MAX:
        _prefixes[device_id] = (ctx, prefix)
    return prefix


def line(row: Row) -> tuple[str, int]:
    """The line protocol line of a row, and how many of its values were skipped."""
    fields: list[str] = []
    skipped = _top_fields(loads(row.data_json), fields)
    fields.append(f"iotnode_seq={row.seq}")
    return f"{_prefix(row.device_id, row.ctx)} {','.join(fields)} {sample_ms(row)}", skipped


def raw_line(raw: RawRow, prefixes: dict[str, str]) -> tuple[str, int]:
    """:func:`line` of one store tuple, its device's prefix taken from ``prefixes``."""
    _rowid, device_id, seq, ts, at, text = raw
    fields: list[str] = []
    skipped = _top_fields(loads(text), fields)
    fields.append(f"iotnode_seq={seq}")
    return f"{prefixes[device_id]} {','.join(fields)} {_ms(ts, at)}", skipped


def _prefixes_of(batch: Batch) -> dict[str, str]:
    return {device_id: _prefix(device_id, ctx) for device_id, ctx in batch.contexts.items()}


def batch_lines(batch: Batch) -> tuple[list[str], int]:
    """:func:`line` of every row of the batch (from the store's tuples: no Row objects), and how
    many values were skipped in all: the Python formatter, which :func:`batch_body` must match."""
    prefixes = _prefixes_of(batch)
    lines = []
    skipped = 0
    for raw in batch.raw:
        text, n = raw_line(raw, prefixes)
        lines.append(text)
        skipped += n
    return lines, skipped


def batch_body(batch: Batch) -> tuple[bytes, int]:
    """The ``/write`` body of a batch -- ``("\\n".join(lines) + "\\n").encode()`` of
    :func:`batch_lines` -- and the skipped values, formatted in C (``_vmlines.c``); a row the C
    code does not format itself (escaped or repeated keys, huge integers, ...) goes through
    :func:`raw_line`."""
    body: bytes
    skipped: int
    prefixes = _prefixes_of(batch)
    if isinstance(batch, ColumnBatch):  # read in columns: the C code reads the buffers as they are
        # prefixes (a dict) is in the order of the batch's devices (contexts_of keeps it)
        body, skipped = format_columns(batch.cols, list(prefixes.values()), prefixes, raw_line)
    else:
        body, skipped = format_batch(batch.raw, prefixes, raw_line)
    return body, skipped


def _line_prefix(device_id: str, ctx: DeviceContext) -> str:
    tags = [f"device_id={_tag(device_id)}", f"type={_tag(ctx.type)}"]
    if ctx.class_:
        tags.append(f"class={_tag(ctx.class_)}")
    if ctx.region:
        tags.append(f"region={_tag(ctx.region)}")
    if ctx.geohash:
        tags.append(f"geohash={_tag(ctx.geohash)}")
    return f"{metric_name(ctx.type)},{','.join(tags)}"


class VictoriaSink(TailSink):
    name = "victoria"
    times_its_writes = True  # the POST runs in a thread: write() times only formatting + waiting

    def __init__(self, url: str, cursor_file: Path) -> None:
        super().__init__()
        self.url = url.rstrip("/")
        self.cursor_file = cursor_file
        self.skipped = SINK_SKIPPED_FIELDS.labels(sink=self.name)
        self.write_seconds = SINK_WRITE_SECONDS.labels(sink=self.name)
        self._history: deque[tuple[float, int]] = deque(maxlen=4096)  # (monotonic, cursor) of writes
        self._started_at: int | None = None  # cursor this process started from
        self._poster: ThreadPoolExecutor | None = None
        self._pending: tuple[Future[float], int, int] | None = None  # (POST in flight, its cursor, skipped)

    def read(self, source: StoreLog, after: int, limit: int, registry: Registry) -> Batch | None:
        return read_column_batch(source, after, limit, registry)  # in columns: batch_body reads them in C

    def _request(self, path: str, body: bytes | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=_TIMEOUT) as resp:
                data: bytes = resp.read()
                return data
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode(errors="replace")
            where = self.url + path.split("?")[0]
            raise SinkDown("http_status", f"{where}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SinkDown("connection", f"{self.url}{path.split('?')[0]}: {reason}") from None

    def open(self) -> None:
        self._request("/health")

    def cursor(self) -> int:
        if self._started_at is not None:
            # A reconnect: VictoriaMetrics may have restarted and lost its unflushed buffer.
            # Rewrite the last REWIND_SECONDS of writes (identical samples: deduplicated).
            if not self._history:
                return self.durable
            newest = self._history[-1][0]
            older = [c for t, c in self._history if t <= newest - REWIND_SECONDS]
            return older[-1] if older else self._started_at
        self._started_at = self._read_cursor_file()
        return self._started_at

    def _read_cursor_file(self) -> int:
        try:
            saved = json.loads(self.cursor_file.read_text())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            raise SinkDown("cursor", f"cannot read the cursor file {self.cursor_file}: {exc}") from None
        if saved.get("url") != self.url:
            log.warning(
                "%s was written for %s, not %s: writing the store from its first row",
                self.cursor_file,
                saved.get("url"),
                self.url,
            )
            return 0
        return int(saved["position"])

    def _save_cursor(self, cursor: int) -> None:
        tmp = self.cursor_file.with_name(self.cursor_file.name + ".tmp")
        try:
            with open(tmp, "w") as fh:
                json.dump({"url": self.url, "position": cursor, "at": time.time()}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.cursor_file)
        except OSError as exc:
            raise SinkDown("cursor", f"cannot write the cursor file {self.cursor_file}: {exc}") from None

    def write(self, batch: Batch) -> None:
        """Format the batch while VictoriaMetrics ingests the previous one, then commit that one
        (its cursor after its acknowledgement) and send this one: ``durable`` trails the batches
        handed over by at most one until :meth:`idle` / :meth:`flush`."""
        body, skipped = batch_body(batch)
        self._commit()  # the previous batch (SinkDown if it failed: this one is dropped, rewritten)
        if self._poster is None:
            self._poster = ThreadPoolExecutor(1, thread_name_prefix="victoria-write")
        self._pending = (self._poster.submit(self._post, body), batch.last, skipped)

    def _post(self, body: bytes) -> float:
        """(In the poster thread.)  POST a batch; return how long VictoriaMetrics took to acknowledge it."""
        started = time.monotonic()
        self._request("/write?precision=ms", body)
        return time.monotonic() - started

    def _commit(self) -> None:
        """Wait for the write in flight; once acknowledged, save its cursor and count it durable."""
        if self._pending is None:
            return
        future, cursor, skipped = self._pending
        self._pending = None
        posted = future.result()  # SinkDown of the POST: nothing committed, the loop reconnects and rewrites
        started = time.monotonic()
        self._save_cursor(cursor)  # after the acknowledgement: a crash in between rewrites this batch
        self.write_seconds.observe(posted + time.monotonic() - started)  # one durable write: POST + cursor
        if skipped:
            self.skipped.inc(skipped)
        self.durable = cursor
        self._history.append((time.monotonic(), cursor))

    def idle(self) -> None:
        self._commit()

    def flush(self) -> None:
        self._commit()

    def close(self) -> None:
        """Drop a write in flight uncommitted (after a failure; a clean stop flushed it first)."""
        self._pending = None
        if self._poster is not None:
            self._poster.shutdown(wait=True)
            self._poster = None
