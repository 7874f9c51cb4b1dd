"""Exact-match accuracy of the built-in tiny MoE model per skill, on held-out prompts.

    python scripts/eval_tiny_moe.py [--model FOLDER] [--per-skill 250]

Prompts come from `mesh_node.engine.builtin_skills.held_out_set`: prompts whose hash puts them in
the held-out split, which the training script never uses. Answers are generated greedily through
the public API (`Generator`, chat messages in, streamed text out, continuous batching) and must
equal the expected answer exactly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh_node.engine import builtin_skills
from mesh_node.engine.evaluation import greedy_answers
from mesh_node.engine.generator import Generator


def evaluate(generator: Generator, per_skill: int, seed: int = 1234) -> dict[str, tuple[int, int]]:
    examples = builtin_skills.held_out_set(per_skill, seed=seed)
    results: dict[str, tuple[int, int]] = {}
    for example, answer in zip(examples, greedy_answers(generator, examples), strict=True):
        correct, total = results.get(example.skill, (0, 0))
        results[example.skill] = (correct + (answer == example.answer), total + 1)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    parser.add_argument("--per-skill", type=int, default=250, help="held-out prompts per skill")
    parser.add_argument("--seed", type=int, default=1234, help="which held-out prompts to draw")
    args = parser.parse_args()
    started = time.perf_counter()
    with Generator.from_pretrained(args.model, device="cpu", max_batch=16) as generator:
        results = evaluate(generator, args.per_skill, args.seed)
    correct = sum(c for c, _ in results.values())
    total = sum(t for _, t in results.values())
    print(f"{'skill':<16}{'exact match':>12}")
    for skill, (c, t) in results.items():
        print(f"{skill:<16}{c / t:>11.1%}  ({c}/{t})")
    print(f"{'overall':<16}{correct / total:>11.1%}  ({correct}/{total})")
    print(f"evaluated in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
