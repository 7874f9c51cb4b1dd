"""Per-(layer, expert) routing statistics over prompts: gate mass, selections, co-selections.

Placement ranks experts by how much they are used; this measures it with the model's own routers.
`gate_mass[l, e]` sums the router probability expert e receives in layer l over all tokens (before
top-k); `selected[l, e]` counts the tokens that chose it; `coselected[l, a, b]` counts the tokens
of layer l that chose both a and b (symmetric, zero diagonal): experts often chosen together are
best kept on one peer, so a token's layer costs one remote call instead of two.

Two ways to run the prompts:
- `measure_expert_usage(model, sequences)`: a loaded model that can run every layer it holds (all
  routed experts loaded, or a dispatcher standing in for the missing ones);
- `measure_expert_usage_by_layer(folder, sequences)`: loads one layer at a time and carries every
  sequence's hidden states through it, so a machine can measure a model larger than its memory
  (peak: one layer's weights plus the hidden states of all sequences).
Both give the same numbers for the same checkpoint, dtype and device.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from mesh_node.engine.checkpoint import Checkpoint
from mesh_node.engine.loading import LoadPlan, load_model
from mesh_node.engine.model import Transformer
from mesh_node.engine.moe import MoELayer


@dataclass
class ExpertUsage:
    layers: tuple[int, ...]  # MoE layer indices, the rows of the tensors below
    gate_mass: torch.Tensor  # [len(layers), num_experts] float64
    selected: torch.Tensor  # [len(layers), num_experts] int64
    tokens: int
    coselected: torch.Tensor | None = None  # [len(layers), num_experts, num_experts] int64

    @property
    def num_experts(self) -> int:
        return int(self.gate_mass.shape[1])

    def ranking(self, layer: int) -> list[int]:
        """Experts of `layer` from most to least used (by gate mass, ties by selections, id)."""
        row = self.layers.index(layer)
        mass = self.gate_mass[row].tolist()
        count = self.selected[row].tolist()
        return sorted(range(len(mass)), key=lambda e: (-mass[e], -count[e], e))


class _Accumulator:
    """The routing observer: sums statistics for a fixed set of MoE layers."""

    def __init__(self, layers: Sequence[int], num_experts: int):
        self.index = {layer: row for row, layer in enumerate(layers)}
        self.num_experts = num_experts
        rows = len(layers)
        self.mass = torch.zeros(rows, num_experts, dtype=torch.float64)
        self.selected = torch.zeros(rows, num_experts, dtype=torch.int64)
        self.coselected = torch.zeros(rows, num_experts, num_experts, dtype=torch.int64)

    def observe(self, layer: int, probs: torch.Tensor, chosen: torch.Tensor, _weights) -> None:
        row = self.index[layer]
        chosen = chosen.reshape(chosen.shape[0], -1).cpu()
        self.mass[row] += probs.sum(0).to(device="cpu", dtype=torch.float64)
        self.selected[row] += torch.bincount(chosen.reshape(-1), minlength=self.num_experts)
        # tokens x experts indicator; its Gram matrix counts the tokens that chose both a and b
        onehot = torch.zeros(chosen.shape[0], self.num_experts, dtype=torch.float64)
        onehot.scatter_(1, chosen, 1.0)
        pairs = (onehot.T @ onehot).round().to(torch.int64)
        pairs.fill_diagonal_(0)
        self.coselected[row] += pairs

    @contextmanager
    def attached(self, moe_layers: Iterable[MoELayer]) -> Iterator[None]:
        moe_layers = list(moe_layers)
        for layer in moe_layers:
            layer.observer = self.observe
        try:
            yield
        finally:
            for layer in moe_layers:
                layer.observer = None

    def usage(self, tokens: int) -> ExpertUsage:
        return ExpertUsage(tuple(self.index), self.mass, self.selected, tokens, self.coselected)


def _check_lengths(sequences: list[list[int]], max_seq_len: int) -> int:
    longest = max((len(s) for s in sequences), default=1)
    if longest > max_seq_len:
        raise ValueError(f"a sequence of {longest} tokens exceeds the model's {max_seq_len}")
    return max(longest, 1)


@torch.inference_mode()
def measure_expert_usage(model: Transformer, sequences: Iterable[Sequence[int]]) -> ExpertUsage:
    """Runs each token sequence through the model (prefill) and accumulates routing statistics."""
    moe_layers = list(model.moe_layers())
    if not moe_layers:
        raise ValueError("the model has no MoE layers")
    accumulator = _Accumulator([layer.layer for layer in moe_layers], moe_layers[0].num_experts)
    sequences = [[int(t) for t in s] for s in sequences]
    cache = model.new_cache(1, _check_lengths(sequences, model.max_seq_len))
    tokens = 0
    with accumulator.attached(moe_layers):
        for sequence in sequences:
            ids = torch.tensor([sequence], device=model.device)
            positions = torch.arange(ids.shape[1], device=model.device)[None]
            model.run_layers(model.embed(ids), positions, cache, 0, ids.shape[1])
            tokens += ids.shape[1]
    return accumulator.usage(tokens)


@torch.inference_mode()
def measure_expert_usage_by_layer(
    source: str | Path | Checkpoint,
    sequences: Iterable[Sequence[int]],
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "auto",
) -> ExpertUsage:
    """Like `measure_expert_usage` on the whole model, but holds one layer in memory at a time."""
    checkpoint = source if isinstance(source, Checkpoint) else Checkpoint.open(source)
    args = checkpoint.args
    moe_indices = [i for i in range(args.num_layers) if args.moe and args.is_sparse_layer(i)]
    if not moe_indices:
        raise ValueError("the model has no MoE layers")
    assert args.moe is not None
    sequences = [[int(t) for t in s] for s in sequences if len(s)]
    seq_len = _check_lengths(sequences, args.max_position_embeddings)
    embeddings = load_model(
        checkpoint,
        plan=LoadPlan(layers=(), head=False),
        dtype=dtype,
        device=device,
        max_seq_len=seq_len,
    )
    hidden = [embeddings.embed(torch.tensor([s], device=embeddings.device)) for s in sequences]
    del embeddings
    accumulator = _Accumulator(moe_indices, args.moe.num_experts)
    for index in range(args.num_layers):
        part = load_model(
            checkpoint,
            plan=LoadPlan(layers=(index,), embeddings=False, head=False),
            dtype=dtype,
            device=device,
            max_seq_len=seq_len,
        )
        cache = part.new_cache(1, seq_len)
        with accumulator.attached(part.moe_layers()):
            for row, h in enumerate(hidden):
                positions = torch.arange(h.shape[1], device=part.device)[None]
                hidden[row] = part.run_layers(h, positions, cache, 0, h.shape[1])
        del part, cache
    return accumulator.usage(sum(len(s) for s in sequences))
