"""`mesh-node status`: show a running node's view of the mesh, read from its console."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse

from mesh_node.console.client import ConsoleError, fetch_status
from mesh_node.console.report import render_status
from mesh_node.terminal import terminal_console

DEFAULT_CONSOLE = "http://127.0.0.1:3131"


def console_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"{text!r} must be an http:// or https:// URL")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port  # ValueError when out of range or not a number
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a usable URL ({exc})") from None
    if not parts.hostname or port == 0:
        raise argparse.ArgumentTypeError(f"{text!r} needs a host (and a port of 1-65535)")
    return text


def positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < seconds <= 600:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 and at most 600 seconds")
    return seconds


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "status",
        help="show the mesh as a running node sees it",
        description=(
            "Fetch the status document from a node's console (GET /api/status) and print the "
            "nodes (status, role, hardware, load, last seen, round-trip time) and the models "
            "with the nodes that serve them, and with --moe-shards which node serves which "
            "shard and what the split costs in quality. Into a pipe or a file the tables are "
            "as wide as COLUMNS says, else 200 columns. Exits with 1 and a one-line message "
            "when the console cannot be reached or does not answer a status document."
        ),
    )
    parser.add_argument(
        "--console",
        metavar="URL",
        type=console_url,
        default=DEFAULT_CONSOLE,
        help="base URL of the node's console (default: %(default)s, the local node's)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=positive_seconds,
        default=5.0,
        help="give up when the console has not answered after this long (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the raw status document as JSON instead of tables (for scripts)",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        document = fetch_status(args.console, timeout=args.timeout)
    except ConsoleError as exc:
        print(f"mesh-node: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    try:
        render_status(document, terminal_console(sys.stdout))
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # fields of odd types
        print(
            f"mesh-node: the console at {args.console} answered a status document that cannot "
            f"be shown ({type(exc).__name__}: {exc}); --json prints it as it is",
            file=sys.stderr,
        )
        return 1
    return 0
