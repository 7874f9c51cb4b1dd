"""`mesh-node new`: print a fresh mesh id."""

from __future__ import annotations

import argparse

from mesh_node.identity import new_mesh_id


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "new",
        help="print a fresh mesh id",
        description=(
            "Print a fresh, high-entropy mesh id. The mesh id is the mesh's shared secret: "
            "every node that joins with it can take part, so share it like a password. "
            "It never leaves your machines (only keys derived from it do)."
        ),
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    print(new_mesh_id())
    return 0
