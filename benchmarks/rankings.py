"""Expert rankings: how well the micro run agrees with the full run, and what each costs.

    nice -n 10 python benchmarks/rankings.py [--model builtin] [--device cpu] [--repeats 3]

Both runs measure the same checkpoint in this process (`placement.rankings.analyze`, nothing
cached). Agreement: mean over MoE layers of the Spearman rank correlation of gate mass, and the
mean share of each layer's top quarter of experts that both runs put there. Times are the best of
`--repeats` runs, after one warm-up run that loads the tokenizer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh_node.placement.rankings import agreement, analyze


def best_time(repeats: int, **options):
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = analyze(**options)
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin", help="model to rank (default: builtin)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (default: cpu)")
    parser.add_argument("--dtype", default=None, help="weights dtype (default: by model size)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = {"model": args.model, "device": args.device, "dtype": args.dtype}
    analyze(kind="micro", **common)  # warm-up: tokenizer, kernels
    micro_s, micro = best_time(args.repeats, kind="micro", **common)
    full_s, full = best_time(args.repeats, kind="full", **common)
    layer_s, by_layer = best_time(args.repeats, kind="full", by_layer=True, **common)
    result = agreement(micro, full)
    print(f"model {args.model}: {len(full.layers)} MoE layers x {full.num_experts} experts")
    print(f"micro: {micro.prompts} prompts, {micro.tokens} tokens, {micro_s:.3f} s")
    print(f"full:  {full.prompts} prompts, {full.tokens} tokens, {full_s:.3f} s")
    print(
        f"full, one layer at a time: {layer_s:.3f} s "
        f"(Spearman vs whole model {agreement(by_layer, full)['spearman']:.4f})"
    )
    per_layer = " ".join(f"{r:.3f}" for r in result["spearman_per_layer"])
    print(
        f"micro vs full: Spearman {result['spearman']:.3f} (per layer {per_layer}), "
        f"top-{result['top_quarter']} overlap {result['top_quarter_overlap']:.3f}"
    )
    print(f"full / micro time: {full_s / micro_s:.1f}x")


if __name__ == "__main__":
    main()
