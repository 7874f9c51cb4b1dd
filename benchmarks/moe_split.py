"""Splitting a MoE model over nodes: what each mode costs. One subcommand per claim.

    python benchmarks/moe_split.py quality [--model FOLDER] [--per-skill 50] [--shards 2 3 4]
                                           [--random-seeds 3] [--core-fraction 0.25]

`quality`: independent-shard mode (each shard: trunk + a core of the hottest experts + its own
experts, router restricted to them) on the built-in model, against the full model, in one run.
Rankings: gate mass over training-split calibration prompts (`measure_expert_usage`). Scores:
greedy exact match and teacher-forced answer perplexity on held-out prompts
(`mesh_node.engine.evaluation`). For each shard count and assignment:

- routed (headline): each prompt served by the shard `shard_for_session(prompt)` picks;
- shard mean: every shard on every prompt, averaged over the shards;
- loss: routed exact match relative to the full model, and routed perplexity / full perplexity.

Assignments: "ranked" (hot core, the rest dealt in snake order by rank), "random" (hot core, the
rest dealt in a seeded random order; averaged over `--random-seeds` seeds), and "no ranking"
(core and deal both from a seeded random ranking: what a split without usage data gets).
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mesh_node.engine import builtin_skills  # noqa: E402
from mesh_node.engine.catalog import resolve_model  # noqa: E402
from mesh_node.engine.evaluation import Quality, evaluate_quality  # noqa: E402
from mesh_node.placement.shard_quality import (  # noqa: E402
    expert_gate_mass,
    measure_shard_quality,
)


def _mean(qualities: list[Quality]) -> Quality:
    return Quality(
        prompts=qualities[0].prompts,
        exact_match=sum(q.exact_match for q in qualities) / len(qualities),
        perplexity=sum(q.perplexity for q in qualities) / len(qualities),
    )


def quality(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    resolved = resolve_model(args.model)
    path = Path(resolved.path)
    examples = builtin_skills.held_out_set(args.per_skill)
    full = evaluate_quality(path, examples=examples)
    gate_mass = expert_gate_mass(path, calibration=args.calibration)
    num_experts = len(next(iter(gate_mass.values())))

    def unranked(seed: int) -> dict[int, list[float]]:
        # a seeded random ranking: masses are a permutation of 0..E-1
        rng = random.Random(f"unranked {seed}")
        return {
            layer: [float(m) for m in rng.sample(range(num_experts), num_experts)]
            for layer in gate_mass
        }

    rows = []
    for shards in args.shards:
        variants = [("ranked", [("ranked", 0, gate_mass)])]
        seeds = range(args.random_seeds)
        variants.append(("random", [("random", s, gate_mass) for s in seeds]))
        variants.append(("no ranking", [("ranked", 0, unranked(s)) for s in seeds]))
        for label, runs in variants:
            measured = [
                measure_shard_quality(
                    path,
                    shards,
                    assignment=assignment,
                    core_fraction=args.core_fraction,
                    seed=seed,
                    examples=examples,
                    full=full,
                    gate_mass=mass,
                )[0]
                for assignment, seed, mass in runs
            ]
            routed = _mean([m.routed for m in measured])
            shard_mean = _mean([m.shard_mean for m in measured])
            rows.append((shards, label, len(runs), routed, shard_mean, measured))
            print(f"  measured {shards} shards, {label} ({time.perf_counter() - started:.0f}s)")

    f = full.overall
    print()
    print(
        f"built-in model ({resolved.name}), {f.prompts} held-out prompts, "
        f"core_fraction {args.core_fraction}, {args.calibration} calibration prompts, "
        f"{platform.machine()}, {time.perf_counter() - started:.0f}s"
    )
    print()
    print(
        "| split | assignment | exact match (routed) | perplexity (routed) | exact match "
        "(shard mean) | perplexity (shard mean) | exact match vs full | perplexity vs full |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| full model | - | {f.exact_match:.1%} | {f.perplexity:.3f} | {f.exact_match:.1%} | "
        f"{f.perplexity:.3f} | - | - |"
    )
    for shards, label, n, routed, shard_mean, _ in rows:
        name = label if n == 1 else f"{label} (mean of {n} seeds)"
        loss = 1 - routed.exact_match / f.exact_match
        print(
            f"| {shards} shards | {name} | {routed.exact_match:.1%} | {routed.perplexity:.3f} | "
            f"{shard_mean.exact_match:.1%} | {shard_mean.perplexity:.3f} | "
            f"-{loss:.1%} | {routed.perplexity / f.perplexity:.2f}x |"
        )
    print()
    print("exact match of each shard on all prompts (ranked):")
    for shards, label, _, _, _, measured in rows:
        if label == "ranked":
            per = ", ".join(f"{q.exact_match:.1%}" for q in measured[0].per_shard)
            print(f"- {shards} shards: {per}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    q = commands.add_parser("quality", help="independent-shard mode vs the full model")
    q.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    q.add_argument("--per-skill", type=int, default=50, help="held-out prompts per skill")
    q.add_argument("--shards", type=int, nargs="+", default=[2, 3, 4])
    q.add_argument("--core-fraction", type=float, default=0.25)
    q.add_argument("--random-seeds", type=int, default=3, help="seeds for the random baselines")
    q.add_argument("--calibration", type=int, default=200, help="calibration prompts")
    q.set_defaults(run=quality)
    args = parser.parse_args()
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
