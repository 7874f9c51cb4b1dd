"""`mesh-node` entry point: builds the argument parser from the command modules and dispatches.

Each command lives in its own module under `mesh_node.cli` and exposes two functions:

    add_parser(subparsers) -> argparse.ArgumentParser   # registers the command and its flags
    run(args: argparse.Namespace) -> int                # turns args into config, calls domain code

Domain code never sees argv or an argparse namespace.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mesh_node import __version__
from mesh_node.cli import identity, join, models, moe, new, status

COMMANDS = (join, new, identity, status, models, moe)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh-node",
        description=(
            "Pool machines into a peer-to-peer mesh for LLM inference. "
            "Start with `mesh-node new` to make a mesh id, then run "
            "`mesh-node join <mesh-id>` on every machine."
        ),
    )
    parser.add_argument("--version", action="version", version=f"mesh-node {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mesh-node models | head -1`: the reader has gone, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
