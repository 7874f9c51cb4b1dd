"""Rotary position embeddings: inverse frequencies per rope type, and cos/sin tables for a cache.

The formulas follow transformers' `modeling_rope_utils` (default, linear, llama3, yarn) operation
for operation in float32, so the tables equal what the reference computes position by position.
"""

from __future__ import annotations

import math

import torch

from mesh_node.engine.config import ModelArgs, RopeArgs
from mesh_node.engine.errors import UnsupportedArchitectureError


def inverse_frequencies(rope: RopeArgs, head_dim: int, max_position_embeddings: int):
    """Returns (inv_freq [head_dim // 2] float32, attention_scaling float)."""
    if rope.partial_rotary_factor != 1.0:
        raise UnsupportedArchitectureError(
            f"partial_rotary_factor {rope.partial_rotary_factor} is not supported (only 1.0)"
        )
    dim = head_dim
    base = rope.theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
    inv_freq = 1.0 / (base**exponents)
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / _required(rope.factor, "factor", rope), 1.0
    if rope.rope_type == "llama3":
        return _llama3(inv_freq, rope), 1.0
    if rope.rope_type == "yarn":
        return _yarn(rope, dim, max_position_embeddings)
    raise UnsupportedArchitectureError(f"rope type {rope.rope_type!r} is not supported")


def _required(value, name: str, rope: RopeArgs):
    if value is None:
        raise UnsupportedArchitectureError(f"rope type {rope.rope_type!r} needs {name!r}")
    return value


def _llama3(inv_freq: torch.Tensor, rope: RopeArgs) -> torch.Tensor:
    factor = _required(rope.factor, "factor", rope)
    low_freq_factor = _required(rope.low_freq_factor, "low_freq_factor", rope)
    high_freq_factor = _required(rope.high_freq_factor, "high_freq_factor", rope)
    old_context_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(rope: RopeArgs, dim: int, max_position_embeddings: int):
    base = rope.theta
    original = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_position_embeddings / original

    def get_mscale(scale, mscale=1):
        if scale <= 1:
            return 1.0
        return 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(
                get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
            )
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(num_rotations):
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, attention_factor


def rope_tables(args: ModelArgs, max_seq_len: int, dtype: torch.dtype, device=None):
    """cos and sin tables [max_seq_len, head_dim] in `dtype`, indexed by absolute position."""
    inv_freq, scaling = inverse_frequencies(args.rope, args.head_dim, args.max_position_embeddings)
    positions = torch.arange(max_seq_len, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * scaling
    sin = emb.sin() * scaling
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)
