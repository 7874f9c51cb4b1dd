"""Tiny random checkpoints of every supported architecture, built offline with transformers.

Each variant turns on the architecture's specifics (rope scaling types, biases, QK-norm, sliding
windows, shared experts, dense layers in MoE models, tied embeddings, both expert layouts) so that
comparing our logits with transformers' exercises them.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB_SIZE = 260  # 256 byte tokens + 4 special tokens (see save_byte_tokenizer)
EOS_ID = 256

BASE = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "bos_token_id": None,
    "eos_token_id": EOS_ID,
    "pad_token_id": None,
}
MOE = {"moe_intermediate_size": 48, "num_experts": 6, "num_experts_per_tok": 2}

VARIANTS: dict[str, tuple[str, dict]] = {
    # name: (model_type, config overrides)
    "llama": (
        "llama",
        {
            "attention_bias": True,
            "mlp_bias": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "mistral": ("mistral", {"sliding_window": 7, "head_dim": 24}),
    "qwen2": (
        "qwen2",
        {
            "use_sliding_window": True,
            "sliding_window": 6,
            "max_window_layers": 1,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "qwen3": (
        "qwen3",
        {
            "head_dim": 16,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0},
        },
    ),
    "mixtral": ("mixtral", {"num_local_experts": 6, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "qwen2_moe",
        {
            **MOE,
            "shared_expert_intermediate_size": 80,
            "mlp_only_layers": [1],
            "norm_topk_prob": False,
            "qkv_bias": True,
        },
    ),
    "qwen3_moe": ("qwen3_moe", {**MOE, "head_dim": 16, "norm_topk_prob": True}),
    "olmoe": ("olmoe", {**MOE, "num_experts": 8, "clip_qkv": 0.4, "norm_topk_prob": False}),
}


def save_byte_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer without merges (ids 0-255 are bytes), with a small chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<eos>", "<user>", "<assistant>", "<pad>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<eos>",
        pad_token="<pad>",
        chat_template=(
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}"
        ),
    )
    fast.save_pretrained(str(folder))


def build_reference(name: str, folder: Path, *, fused_experts: bool = False, seed: int = 0):
    """Builds the transformers model of a variant with random weights and saves it to `folder`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = VARIANTS[name]
    kwargs = {**BASE, **overrides}
    if model_type in ("mixtral", "olmoe"):
        kwargs["intermediate_size"] = kwargs.pop(
            "moe_intermediate_size", kwargs["intermediate_size"]
        )
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.ndim == 1 and "norm" in param_name:
                param.uniform_(0.6, 1.4)
            elif param.ndim == 1:
                param.normal_(0.0, 0.1)
            else:
                param.normal_(0.0, 0.3 / param.shape[-1] ** 0.5 * 3)
    model.eval()
    model.save_pretrained(str(folder), save_original_format=not fused_experts)
    save_byte_tokenizer(folder)
    return model
