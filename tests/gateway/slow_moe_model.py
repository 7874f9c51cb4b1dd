"""A random-weight Mixture-of-Experts checkpoint (qwen3_moe: 8 layers x 8 experts, top-2) that
decodes long enough to kill a node mid-answer and never stops early (see slow_model.py)."""

from __future__ import annotations

from pathlib import Path

from tests.gateway.slow_model import build_random_checkpoint

NAME = "slow-moe"

# a small qwen3_moe: 8 experts of 256 -> 256 wide, top-2 (8 layers here; tests may take fewer)
TINY_MOE = dict(
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=256,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
)


def build_slow_moe_model(parent: Path) -> Path:
    return build_random_checkpoint(parent, NAME, "qwen3_moe", 4321, **TINY_MOE)
