"""A random-weight Mixture-of-Experts checkpoint (qwen3_moe: 8 layers x 8 experts, top-2) that
decodes long enough to kill a node mid-answer and never stops early (EOS logit pinned to zero,
so greedy decoding never picks it). Built offline with transformers."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.engine.reference_checkpoints import EOS_ID, VOCAB_SIZE, save_byte_tokenizer

NAME = "slow-moe"


def build_slow_moe_model(parent: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = parent / NAME
    if (folder / "config.json").exists():
        return folder
    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=VOCAB_SIZE,
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
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(4321)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[EOS_ID].zero_()
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    save_byte_tokenizer(folder)
    return folder
