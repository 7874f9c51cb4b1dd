"""The MoE feed-forward block: router, top-k gating, grouped expert dispatch, weighted combine.

The layer owns routing (router matmul, softmax, top-k, each architecture's normalization) and the
combine; the routed experts are computed by `self.experts`, any `ExpertComputer` (an `ExpertBank`
locally, a dispatcher under expert parallelism). Tokens are sorted by expert once per call, so each
used expert sees one contiguous block of rows: no Python loop over tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mesh_node.engine.experts import ExpertComputer

# (layer, router probabilities [N, E] float32, chosen experts [N, k], gate weights [N, k]) -> None
RoutingObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class DenseMLP(nn.Module):
    """SwiGLU MLP with fused gate/up weight `[2I, H]` (gate rows first) and down `[H, I]`."""

    def __init__(
        self,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        gate_up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.gate_up = nn.Parameter(gate_up, requires_grad=False)
        self.down = nn.Parameter(down, requires_grad=False)
        self.gate_up_bias = None if gate_up_bias is None else nn.Parameter(gate_up_bias, False)
        self.down_bias = None if down_bias is None else nn.Parameter(down_bias, False)
        self.intermediate_size = down.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x, self.gate_up, self.gate_up_bias)
        inter = self.intermediate_size
        return F.linear(
            F.silu(gate_up[..., :inter]) * gate_up[..., inter:], self.down, self.down_bias
        )


class MoELayer(nn.Module):
    def __init__(
        self,
        layer: int,
        router: torch.Tensor,
        top_k: int,
        normalize_top_k: bool,
        experts: ExpertComputer,
        shared_expert: DenseMLP | None = None,
        shared_expert_gate: torch.Tensor | None = None,
        float_gate_weights: bool = False,
    ):
        super().__init__()
        self.layer = layer
        self.router = nn.Parameter(router, requires_grad=False)  # [E, H]
        self.num_experts = router.shape[0]
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        # mixtral multiplies expert outputs by float32 gate weights; the others cast them first
        self.float_gate_weights = float_gate_weights
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = (
            None if shared_expert_gate is None else nn.Parameter(shared_expert_gate, False)
        )
        self.observer: RoutingObserver | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (gate weights [N, k], expert ids [N, k])."""
        logits = F.linear(x, self.router)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.float_gate_weights:
            weights = weights.to(x.dtype)
        if self.observer is not None:
            self.observer(self.layer, probs, chosen, weights)
        return weights, chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.route(x)
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        experts = [e for e, c in enumerate(counts) if c]
        token_of_row = order // self.top_k
        rows = x.index_select(0, token_of_row)
        outputs = self.experts.run_grouped(rows, experts, [counts[e] for e in experts])
        outputs = (outputs * weights.reshape(-1)[order, None]).to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of_row, outputs)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            out = out + torch.sigmoid(F.linear(x, self.shared_expert_gate)) * shared
        return out.reshape(shape)
