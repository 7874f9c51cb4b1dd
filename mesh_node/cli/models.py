"""`mesh-node models`: list the models this machine can serve without downloading anything."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rich.table import Table
from rich.text import Text

from mesh_node.engine.catalog import ModelInfo, check_cache_folder, list_local_models
from mesh_node.engine.errors import EngineError
from mesh_node.terminal import fits, terminal_console


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
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="Hugging Face cache to scan, an existing folder; a Hugging Face home (HF_HOME, "
        "e.g. ~/.cache/huggingface) stands for the cache in its hub folder, and a line says so "
        "(default: the hub cache: HF_HUB_CACHE, else $HF_HOME/hub, else "
        "~/.cache/huggingface/hub); `mesh-node join` takes the same --cache-dir to serve a "
        "model from it",
    )
    cache.add_argument(
        "--no-hf-cache",
        action="store_true",
        help="do not scan the Hugging Face cache (not with --cache-dir, which names one to scan)",
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


def _table(models: list[ModelInfo], *, compact: bool) -> Table:
    """A column per fact and a line per model; compact (when that is wider than the terminal):
    the architecture under the name, and a long name folded onto more lines, so that the
    numbers stay whole."""
    table = Table(title="Local models")
    if compact:  # (a model's facts on two lines or more: a blank line between models)
        table.leading = 1
        table.add_column("name, architecture", overflow="fold")
    else:
        table.add_column("name", no_wrap=True)
        table.add_column("architecture", no_wrap=True)
    for column in ("size", "params", "active"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("experts", no_wrap=True)
    table.add_column("source", no_wrap=True)
    for model in models:
        if compact:
            names = [Text(model.name).append(f"\n{model.architecture}", "dim")]
        else:
            names = [Text(model.name), Text(model.architecture)]
        experts = f"{model.experts} top-{model.experts_per_token}" if model.experts else "dense"
        table.add_row(
            *names,
            _size(model.size_bytes),
            _count(model.parameters),
            _count(model.active_parameters),
            experts,
            Text(model.source),
        )
    return table


def run(args: argparse.Namespace) -> int:
    cache = None
    try:
        if args.cache_dir is not None:
            cache = check_cache_folder(args.cache_dir)
        models = list_local_models(
            args.path, cache_dir=cache, include_hf_cache=not args.no_hf_cache
        )
    except (EngineError, OSError) as exc:
        print(f"mesh-node: {exc}", file=sys.stderr)
        return 2
    console = terminal_console(sys.stdout)
    usable = [model for model in models if not model.error]
    table = _table(usable, compact=False)
    if not fits(table, console):
        table = _table(usable, compact=True)
    console.print(table)
    for model in models:
        if not model.error:
            console.print(f"{model.name}: {model.path}", overflow="fold", highlight=False)
    for model in models:
        if model.error:
            console.print(f"[yellow]unusable[/yellow] {model.name} ({model.path}): {model.error}")
    given = Path(args.cache_dir).expanduser() if args.cache_dir is not None else None
    if cache is not None and cache != given:
        console.print(
            f"{given} is a Hugging Face home: listed its hub cache {cache}",
            highlight=False,
            markup=False,
        )
    cached = [m.name for m in models if m.source == "hf-cache" and not m.error]
    if cache is not None and cached:  # (join looks in the default cache otherwise)
        console.print(
            f"To serve one from this cache: mesh-node join MESH_ID --model {cached[0]} "
            f"--cache-dir {shlex.quote(str(cache.absolute()))}",
            soft_wrap=True,  # (one line to copy, however narrow the terminal)
            highlight=False,
            markup=False,
        )
    return 0
