"""`mesh-node models`: list the models this machine can serve without downloading anything."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from mesh_node.engine.catalog import list_local_models
from mesh_node.engine.errors import EngineError


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "models",
        help="list local models (built-in, Hugging Face cache, given folders)",
        description=(
            "List the models available on this machine: the built-in tiny MoE model, models in "
            "the local Hugging Face cache, and model folders given with --path. For each: "
            "architecture, size on disk, parameter count (total and active per token) and "
            "routed experts. Any of them can be passed to `mesh-node join --model`, with the "
            "same --cache-dir for those listed from a --cache-dir (the output ends with the "
            "command). Exits with 2 and a message when a --path or --cache-dir folder is missing."
        ),
    )
    parser.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="DIR",
        help=(
            "also list this folder: a model folder (config.json + *.safetensors) or a folder of "
            "model folders; may be repeated"
        ),
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="Hugging Face cache to scan, an existing folder (default: the hub cache: "
        "HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub); `mesh-node join` "
        "takes the same --cache-dir to serve a model from it",
    )
    parser.add_argument(
        "--no-hf-cache",
        action="store_true",
        help="do not scan the Hugging Face cache",
    )
    parser.set_defaults(run=run)
    return parser


def _size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    try:
        models = list_local_models(
            args.path, cache_dir=args.cache_dir, include_hf_cache=not args.no_hf_cache
        )
    except (EngineError, OSError) as exc:
        print(f"mesh-node: {exc}", file=sys.stderr)
        return 2
    table = Table(title="Local models")
    for column in ("name", "architecture", "size", "params", "active", "experts", "source"):
        table.add_column(
            column,
            justify="right" if column in ("size", "params", "active") else "left",
            no_wrap=True,
        )

    problems = []
    for model in models:
        if model.error:
            problems.append(f"{model.name} ({model.path}): {model.error}")
            continue
        experts = f"{model.experts} top-{model.experts_per_token}" if model.experts else "dense"
        table.add_row(
            model.name,
            model.architecture,
            _size(model.size_bytes),
            _count(model.parameters),
            _count(model.active_parameters),
            experts,
            model.source,
        )
    console = Console()
    console.print(table)
    for model in models:
        if not model.error:
            console.print(f"{model.name}: {model.path}", overflow="fold", highlight=False)
    for problem in problems:
        console.print(f"[yellow]unusable[/yellow] {problem}")
    cached = [m.name for m in models if m.source == "hf-cache" and not m.error]
    if args.cache_dir is not None and cached:  # (join looks in the default cache otherwise)
        folder = Path(args.cache_dir).expanduser().absolute()
        console.print(
            f"To serve one from this cache: mesh-node join MESH_ID --model {cached[0]} "
            f"--cache-dir {shlex.quote(str(folder))}",
            soft_wrap=True,  # (one line to copy, however narrow the terminal)
            highlight=False,
            markup=False,
        )
    return 0
