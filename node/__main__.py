"""``python -m node`` / ``iotnode``: a small dispatcher of operator subcommands.

Each subcommand is a pair ``(configure(parser), run(args) -> int)`` registered in
:data:`COMMANDS`; add one by writing those two functions (in your own module) and
one line here.

    python -m node token DEVICE_ID [--ttl SECONDS | --no-expiry]
    python -m node token --client --devices a,b [--ttl SECONDS | --no-expiry] [--subject NAME]

Tokens expire after one year unless ``--ttl`` says otherwise (or ``NODE_JWT_MAX_TTL``
is shorter); ``--no-expiry`` prints one without ``exp`` (refused by nodes run with
``NODE_JWT_REQUIRE_EXP=on`` or ``NODE_JWT_MAX_TTL``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from node.errors import NodeError

Configure = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------------ token
def _configure_token(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("device_id", nargs="?", help="device id (the token's sub claim)")
    parser.add_argument("--client", action="store_true", help="issue a client-app token (fanout) instead")
    parser.add_argument(
        "--devices", help="with --client: comma-separated device ids the client may follow, or '*'"
    )
    parser.add_argument("--subject", default="client", help="with --client: the sub claim (default: client)")
    parser.add_argument(
        "--ttl",
        type=float,
        default=None,
        help="seconds until the token expires (default: one year, or NODE_JWT_MAX_TTL if shorter)",
    )
    parser.add_argument(
        "--no-expiry", action="store_true", help="a token without exp (not for nodes that require one)"
    )


def _run_token(args: argparse.Namespace) -> int:
    from node.auth import DEFAULT_CLI_TTL, issue_client_token, issue_device_token, load_secret
    from node.config import load_settings

    parser: argparse.ArgumentParser = args.parser
    if args.ttl is not None and not args.ttl > 0:
        parser.error(f"--ttl must be > 0 seconds, got {args.ttl}")
    if args.ttl is not None and args.no_expiry:
        parser.error("--ttl and --no-expiry exclude each other")
    if args.client:
        if args.device_id is not None:
            parser.error("--client takes no DEVICE_ID; list the devices with --devices a,b")
        if not args.devices:
            parser.error("--client needs --devices a,b (or --devices '*')")
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        if not devices:
            parser.error(f"--devices lists no device id: {args.devices!r}")
    else:
        if args.devices is not None:
            parser.error("--devices is only for --client tokens")
        if args.device_id is None:
            parser.error("DEVICE_ID is required (or --client --devices a,b)")
    settings = load_settings()
    secret = load_secret(settings)
    ttl = args.ttl
    if ttl is None and not args.no_expiry:
        ttl = min(DEFAULT_CLI_TTL, settings.jwt_max_ttl or DEFAULT_CLI_TTL)
    try:
        if args.client:
            token = issue_client_token(secret, devices, ttl=ttl, subject=args.subject)
        else:
            token = issue_device_token(secret, args.device_id, ttl=ttl)
    except ValueError as exc:
        parser.error(str(exc))
    print(token)
    return 0


COMMANDS: dict[str, tuple[str, Configure, Run]] = {
    "token": ("print a device (or --client) JWT signed with the node's secret", _configure_token, _run_token),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="iotnode", description="iotnode operator commands")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, run) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        configure(command_parser)
        command_parser.set_defaults(run=run, parser=command_parser)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except NodeError as exc:
        print(f"iotnode {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
