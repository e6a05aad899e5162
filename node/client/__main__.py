"""``python -m node.client``: send JSON lines from stdin as one device (see ``--help``, docs/client.md)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from node.client.device import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Backoff,
    ClientClosed,
    DeviceClient,
    HandshakeRefused,
    MessageRejected,
    MessageTooLarge,
)
from node.errors import NodeError

# -------------------------------------------------------------------------- CLI
DEFAULT_URL: Final = "ws://127.0.0.1:8000/v1/ingest"


def _token_for(args: argparse.Namespace) -> str:
    if args.token:
        return str(args.token)
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise SystemExit(
                f"iotnode client: cannot read --token-file {args.token_file!r}: {exc.strerror}"
            ) from None
    if args.device:
        # Convenience on the node's own machine: sign with the local node's secret.
        from node.auth import issue_device_token, load_secret
        from node.config import load_settings

        return issue_device_token(load_secret(load_settings()), args.device)
    raise SystemExit(
        "iotnode client: give --token, --token-file, or --device (signs with the local node's secret)"
    )


def _parse_line(line: str, number: int, envelope: bool) -> tuple[Any, float | int | None]:
    """One stdin line -> (data, ts); raises ValueError naming the line."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {number}: not JSON ({exc.msg} at character {exc.pos})") from None
    except ValueError as exc:  # e.g. an integer with too many digits
        raise ValueError(f"line {number}: not usable JSON ({exc})") from None
    if not envelope:
        return value, None
    if type(value) is not dict or "data" not in value:
        raise ValueError(
            f'line {number}: expected an object with a "data" key (--envelope), got {line[:48]!r}'
        )
    ts = value.get("ts")
    if ts is not None and (type(ts) not in (int, float)):
        raise ValueError(f"line {number}: ts must be a number, got {ts!r}")
    return value["data"], ts


async def _stdin_lines() -> Any:
    """Lines of stdin, read by a daemon thread (a blocking read must not stop the
    loop from taking acks, nor keep the process alive after Ctrl-C), through a
    bounded queue."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1024)

    def reader() -> None:
        try:
            for line in sys.stdin:
                asyncio.run_coroutine_threadsafe(queue.put(line), loop).result()
        except (RuntimeError, ValueError, OSError):  # loop closed, stdin closed
            return
        finally:
            try:
                asyncio.run_coroutine_threadsafe(queue.put(""), loop)
            except RuntimeError:
                pass

    threading.Thread(target=reader, name="stdin", daemon=True).start()
    while True:
        line = await queue.get()
        if not line:
            return
        yield line


async def _cli(args: argparse.Namespace, token: str) -> int:
    out = sys.stdout
    rejected = 0
    invalid = 0
    sent = 0

    def report(fut: asyncio.Future[int], *, number: int) -> None:
        nonlocal rejected
        exc = fut.exception() if not fut.cancelled() else ClientClosed()
        if exc is None:
            if args.print_acks:
                out.write(json.dumps({"line": number, "ack": fut.result()}) + "\n")
        elif isinstance(exc, (MessageRejected, MessageTooLarge)):
            rejected += 1
            out.write(
                json.dumps({"line": number, "seq": getattr(exc, "seq", None), "error": str(exc)}) + "\n"
            )

    client = DeviceClient(
        args.url,
        token,
        binary=not args.json,
        window=args.window,
        max_pending=args.max_pending,
        max_message_bytes=args.max_message_bytes,
        backoff=Backoff(args.backoff_initial, args.backoff_max),
        outbox=args.outbox,
        device=args.device or "",
    )
    started = time.monotonic()
    try:
        await client.start(wait=False)
        number = 0
        async for line in _stdin_lines():
            number += 1
            if not line.strip():
                continue
            try:
                data, ts = _parse_line(line, number, args.envelope)
                if args.ts and ts is None:
                    ts = time.time()
                fut = await client.send(data, ts)
            except (ValueError, MessageTooLarge) as exc:  # ProtocolError is a ValueError
                invalid += 1
                print(
                    f"iotnode client: {exc if str(exc).startswith('line') else f'line {number}: {exc}'}",
                    file=sys.stderr,
                )
                continue
            sent += 1
            fut.add_done_callback(functools.partial(report, number=number))
        try:
            await client.flush(args.timeout)
        except TimeoutError:
            print(
                f"iotnode client: {client.pending} messages not acked after {args.timeout} s", file=sys.stderr
            )
    except HandshakeRefused as exc:
        print(f"iotnode client: {exc}", file=sys.stderr)
        await client.close(flush=False)
        return 2
    unacked = client.pending
    acked = client.acked
    await client.close(flush=False)
    elapsed = time.monotonic() - started
    summary = {
        "sent": sent,
        "acked": acked,
        "rejected": rejected,
        "invalid_lines": invalid,
        "unacked": unacked,
        "connections": client.connections,
        "seconds": round(elapsed, 3),
    }
    print(json.dumps(summary), file=sys.stderr)
    return 0 if (rejected == invalid == unacked == 0) else 1


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m node.client",
        description="Send JSON lines from stdin to an iotnode as one device (protocol v1); "
        "print a JSON summary on stderr.  Exit 0 when every line was acked, 1 when some "
        "were invalid, refused or left unacked, 2 when the token was refused.",
    )
    p.add_argument("--url", default=DEFAULT_URL, help=f"ingest endpoint (default {DEFAULT_URL})")
    p.add_argument("--token", help="device JWT")
    p.add_argument("--token-file", help="file holding the device JWT")
    p.add_argument(
        "--device",
        help="device id: names the outbox owner; without a token, sign one "
        "with the local node's secret (NODE_JWT_SECRET or NODE_DATA_DIR/jwt_secret)",
    )
    p.add_argument(
        "--envelope",
        action="store_true",
        help='each line is {"data": ..., "ts": ...} (default: each line is the data value)',
    )
    p.add_argument("--ts", action="store_true", help="stamp messages without a ts with the device clock")
    p.add_argument("--json", action="store_true", help="send JSON text frames (default: MessagePack binary)")
    p.add_argument("--outbox", help="SQLite file keeping unacked messages across restarts")
    p.add_argument("--print-acks", action="store_true", help='print {"line": n, "ack": seq} per acked line')
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the last acks (default 30)"
    )
    p.add_argument("--window", type=int, default=256, help="messages in flight unacked (default 256)")
    p.add_argument(
        "--max-pending",
        type=int,
        default=10_000,
        help="messages kept unacked before reading more input (default 10000)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="refuse larger frames locally (default 65536, the node's default)",
    )
    p.add_argument(
        "--backoff-initial", type=float, default=0.5, help="first reconnect ceiling, s (default 0.5)"
    )
    p.add_argument("--backoff-max", type=float, default=30.0, help="largest reconnect delay, s (default 30)")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s client %(levelname)s: %(message)s")
    token = _token_for(args)
    try:
        return asyncio.run(_cli(args, token))
    except (ValueError, NodeError) as exc:  # bad options (window, url, backoff), outbox errors
        print(f"iotnode client: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
