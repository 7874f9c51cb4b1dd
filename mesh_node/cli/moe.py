"""`mesh-node moe analyze <model>`: a MoE model's expert rankings, measured or from the cache."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mesh_node.engine.catalog import check_cache_folder, resolve_model
from mesh_node.placement.rankings import ExpertRankings, cached_or_analyze


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "moe",
        help="mixture-of-experts tools (expert rankings)",
        description="Tools for mixture-of-experts models.",
    )
    actions = parser.add_subparsers(dest="moe_command", metavar="ACTION", required=True)
    analyze = actions.add_parser(
        "analyze",
        help="rank a model's experts by how much its routers use them",
        description=(
            "Run calibration prompts through a MoE model and print, per MoE layer, its experts "
            "from most to least used with their share of router probability (gate mass) and "
            "the share of tokens that chose them. Results are cached by checkpoint fingerprint "
            "(under $MESH_NODE_CACHE, $XDG_CACHE_HOME/mesh-node or ~/.cache/mesh-node), so a "
            "second run answers at once. Exits with 2 and a message for an unknown model, a "
            "model without experts or a --cache-dir folder that is missing."
        ),
    )
    analyze.add_argument(
        "model",
        help="'builtin', a model folder, or a Hugging Face repo id already in the local cache "
        "(see --cache-dir)",
    )
    analyze.add_argument(
        "--cache-dir",
        metavar="DIR",
        type=Path,
        default=None,
        help="the Hugging Face cache (an existing folder) a repo id is taken from (never "
        "downloaded): give the folder `mesh-node models --cache-dir` listed; a Hugging Face "
        "home (HF_HOME) stands for the cache in its hub folder (default: the hub cache: "
        "HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)",
    )
    size = analyze.add_mutually_exclusive_group()
    size.add_argument(
        "--micro",
        dest="kind",
        action="store_const",
        const="micro",
        help="quick run: 4 prompts of up to 16 tokens (the default)",
    )
    size.add_argument(
        "--full",
        dest="kind",
        action="store_const",
        const="full",
        help="full run: 64 prompts of up to 128 tokens",
    )
    analyze.add_argument(
        "--json",
        action="store_true",
        help="print the rankings as one JSON document (for scripts)",
    )
    analyze.add_argument(
        "--device",
        default="cpu",
        help="where to run the model: cpu, cuda[:N] or auto (default: %(default)s)",
    )
    analyze.add_argument(
        "--dtype",
        default=None,
        help="weights dtype: float32, bfloat16 or float16 (default: chosen by model size)",
    )
    analyze.add_argument(
        "--refresh",
        action="store_true",
        help="measure again even if rankings for this checkpoint are cached",
    )
    analyze.add_argument(
        "--by-layer",
        action="store_true",
        help="load one layer at a time (slower; for a model larger than this machine's memory)",
    )
    analyze.set_defaults(run=run, kind="micro")
    return parser


def render(rankings: ExpertRankings, from_cache: bool) -> str:
    origin = "from cache" if from_cache else "measured now"
    lines = [
        f"{rankings.kind} expert rankings ({origin}): {rankings.prompts} prompts, "
        f"{rankings.tokens} tokens, {rankings.num_experts} experts per layer",
        f"checkpoint fingerprint {rankings.fingerprint}",
        f"rankings digest {rankings.digest()}",
    ]
    for row, layer in enumerate(rankings.layers):
        mass, chosen = rankings.gate_mass[row], rankings.selection[row]
        cells = [
            f"{e}:{100 * mass[e]:.1f}%/{100 * chosen[e]:.0f}%" for e in rankings.ranking(layer)
        ]
        lines.append(f"layer {layer:>3}  " + "  ".join(cells))
    lines.append("(expert:gate mass/selection, hottest first)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from mesh_node.engine.errors import EngineError
    from mesh_node.placement.rankings import NoExpertsError

    try:
        cache = None if args.cache_dir is None else check_cache_folder(args.cache_dir)
        rankings, from_cache = cached_or_analyze(
            resolve_model(args.model, cache_dir=cache, allow_download=False),
            args.kind,
            device=args.device,
            dtype=args.dtype,
            refresh=args.refresh,
            by_layer=args.by_layer,
        )
    except (EngineError, NoExpertsError, ValueError, OSError) as exc:
        print(f"mesh-node moe analyze: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**rankings.to_dict(), "from_cache": from_cache}))
    else:
        print(render(rankings, from_cache))
    return 0
