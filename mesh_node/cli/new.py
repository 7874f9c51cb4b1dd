"""`mesh-node new`: print a fresh mesh id."""

from __future__ import annotations

import argparse
import os
import sys

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
    parser.add_argument(
        "--save",
        metavar="FILE",
        help="also write it to FILE, readable by this user only (an existing FILE is left "
        "alone: the command fails); `mesh-node join --mesh-id-file FILE` reads it",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    mesh_id = new_mesh_id()
    if args.save is not None:
        try:
            handle = os.open(args.save, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            print(
                f"mesh-node: {args.save} exists already and is left alone (it may hold the id "
                f"of a mesh you use): join that mesh with `mesh-node join --mesh-id-file "
                f"{args.save}`, or save a new id to another file",
                file=sys.stderr,
            )
            return 2
        except OSError as exc:
            print(f"mesh-node: cannot save the mesh id to {args.save}: {exc}", file=sys.stderr)
            return 2
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(mesh_id + "\n")
    print(mesh_id)
    return 0
