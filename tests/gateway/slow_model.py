"""Random-weight checkpoints that decode slowly enough to kill a node mid-answer and never stop
early: their EOS logit is pinned to zero, so greedy decoding (deterministic) does not pick it.
Built offline with transformers. `build_slow_model`: a dense qwen3 (~100 tokens/s here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.engine.reference_checkpoints import EOS_ID, VOCAB_SIZE, save_byte_tokenizer

NAME = "slow-qwen3"


def build_random_checkpoint(
    parent: Path, name: str, model_type: str, seed: int, **config: Any
) -> Path:
    """`parent/name`: a `model_type` checkpoint with random weights (seeded) that never emits
    EOS, and the byte tokenizer; reused when it is already there."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = parent / name
    if (folder / "config.json").exists():
        return folder
    settings = dict(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(model_type, **{**settings, **config}), dtype=torch.float32
    )
    with torch.no_grad():
        model.lm_head.weight[EOS_ID].zero_()
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    save_byte_tokenizer(folder)
    return folder


def build_slow_model(parent: Path, seed: int = 1234) -> Path:
    """`parent/slow-qwen3`; another seed gives another checkpoint of that name and shape."""
    return build_random_checkpoint(
        parent,
        NAME,
        "qwen3",
        seed,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
    )
