"""A random-weight checkpoint that decodes slowly enough (~100 tokens/s here) to kill its
host mid-answer, and that never stops early: its EOS logit is pinned to zero, so greedy
decoding (deterministic) does not pick it. Built offline with transformers."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.engine.reference_checkpoints import EOS_ID, VOCAB_SIZE, save_byte_tokenizer

NAME = "slow-qwen3"


def build_slow_model(parent: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = parent / NAME
    if (folder / "config.json").exists():
        return folder
    config = AutoConfig.for_model(
        "qwen3",
        vocab_size=VOCAB_SIZE,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[EOS_ID].zero_()
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    save_byte_tokenizer(folder)
    return folder
