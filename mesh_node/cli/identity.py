"""`mesh-node id`: print this machine's node id."""

from __future__ import annotations

import argparse
import sys

from mesh_node.identity import KEY_FILE, IdentityError, NodeIdentity, default_home


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "id",
        help="print this machine's node id",
        description=(
            "Print the node id of this machine (creating the node key on first use). "
            f"The key lives in $MESH_NODE_HOME/{KEY_FILE} (default ~/.mesh-node/{KEY_FILE})."
        ),
    )
    parser.add_argument(
        "--short", action="store_true", help="print only the short form (first characters)"
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        identity = NodeIdentity.load_or_create(default_home())
    except IdentityError as exc:
        print(f"mesh-node: {exc}", file=sys.stderr)
        return 2
    node_id = identity.node_id
    print(node_id.short if args.short else f"{node_id}  (short: {node_id.short})")
    return 0
