"""Per-(layer, expert) routing statistics over prompts: gate mass and selection frequency.

Placement ranks experts by how much they are used; this measures it with the model's own routers.
`gate_mass[l, e]` sums the router probability expert e receives in layer l over all tokens (before
top-k); `selected[l, e]` counts the tokens that chose it. The model must be able to run every
layer it holds (all routed experts loaded, or a dispatcher standing in for the missing ones).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mesh_node.engine.model import Transformer


@dataclass
class ExpertUsage:
    layers: tuple[int, ...]  # MoE layer indices, the rows of the tensors below
    gate_mass: torch.Tensor  # [len(layers), num_experts] float64
    selected: torch.Tensor  # [len(layers), num_experts] int64
    tokens: int

    def ranking(self, layer: int) -> list[int]:
        """Experts of `layer` from most to least used (by gate mass, ties by selections, id)."""
        row = self.layers.index(layer)
        mass = self.gate_mass[row].tolist()
        count = self.selected[row].tolist()
        return sorted(range(len(mass)), key=lambda e: (-mass[e], -count[e], e))


@torch.inference_mode()
def measure_expert_usage(model: Transformer, sequences: Iterable[Sequence[int]]) -> ExpertUsage:
    """Runs each token sequence through the model (prefill) and accumulates routing statistics."""
    moe_layers = list(model.moe_layers())
    if not moe_layers:
        raise ValueError("the model has no MoE layers")
    index = {layer.layer: row for row, layer in enumerate(moe_layers)}
    num_experts = moe_layers[0].num_experts
    mass = torch.zeros(len(moe_layers), num_experts, dtype=torch.float64)
    selected = torch.zeros(len(moe_layers), num_experts, dtype=torch.int64)
    tokens = 0

    def observe(layer: int, probs: torch.Tensor, chosen: torch.Tensor, _weights) -> None:
        row = index[layer]
        mass[row] += probs.sum(0).to(device="cpu", dtype=torch.float64)
        selected[row] += torch.bincount(chosen.reshape(-1), minlength=num_experts).cpu()

    for layer in moe_layers:
        layer.observer = observe
    sequences = [list(s) for s in sequences]
    longest = max((len(s) for s in sequences), default=1)
    if longest > model.max_seq_len:
        raise ValueError(f"a sequence of {longest} tokens exceeds the model's {model.max_seq_len}")
    cache = model.new_cache(1, max(longest, 1))
    try:
        for sequence in sequences:
            ids = torch.tensor([sequence], device=model.device)
            positions = torch.arange(ids.shape[1], device=model.device)[None]
            model.run_layers(model.embed(ids), positions, cache, 0, ids.shape[1])
            tokens += ids.shape[1]
    finally:
        for layer in moe_layers:
            layer.observer = None
    return ExpertUsage(tuple(index), mass, selected, tokens)
