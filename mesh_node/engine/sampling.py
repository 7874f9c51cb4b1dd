"""Sampling parameters and the next-token choice for a batch of rows with their own parameters.

Greedy (temperature 0) is an argmax. Otherwise: temperature, then top-k, then top-p (nucleus), then
a draw whose randomness depends only on (seed, index of the token in the completion). The same
request replayed on another host from the same point therefore draws the same continuation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) over 64 bits


MIN_TEMPERATURE = 1e-5  # below this a sampled answer is the argmax one anyway


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy. top_k 0 and top_p 1.0 disable those filters. seed None: the
    generator draws one per request. max_tokens counts completion tokens (including tokens given
    as already generated in a replayed request). stop: strings that end the completion (not
    included in the text). stop_token_ids: extra ids that end it (the model's EOS ids always do
    unless ignore_eos).
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        for name in ("max_tokens", "top_k"):
            if type(getattr(self, name)) is not int:
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature < math.inf:  # (NaN included; infinity would sample
            # uniformly, a value no client means: a peer may send any float)
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0 (or below MIN_TEMPERATURE, where dividing the logits
        by it would overflow float32), or top_k 1."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


def token_seed(seed: int, index: int) -> int:
    return ((seed * _MIX) ^ (index * 0xBF58476D1CE4E5B9) ^ (index >> 3)) & 0x7FFF_FFFF_FFFF_FFFF


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row [V] float32 -> probabilities after temperature, top-k and top-p."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly above a token
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    indices: Sequence[int],
) -> list[int]:
    """logits [B, V] float32; per row its params, seed and completion index -> next token ids."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for row, p in enumerate(params):
        if p.greedy:
            out.append(greedy[row])
            continue
        probs = filter_logits(logits[row], p)
        # drawn on the CPU whatever the device: CPU and CUDA generators give different streams
        # for one seed, and a seeded request replayed on another host must go on the same way
        generator = torch.Generator().manual_seed(token_seed(seeds[row], indices[row]))
        noise = torch.empty(probs.shape, dtype=probs.dtype).exponential_(generator=generator)
        noise = noise.to(probs.device, non_blocking=True)
        out.append(int(torch.argmax(probs / noise)))  # exponential race == categorical draw
    return out
