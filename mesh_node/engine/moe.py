"""The MoE feed-forward block: router, top-k gating, grouped expert dispatch, weighted combine.

The layer owns routing (router matmul, softmax, top-k, each architecture's normalization) and the
combine; the routed experts are computed by `self.experts`, any `ExpertComputer` (an `ExpertBank`
locally, a dispatcher under expert parallelism). Tokens are sorted by expert once per call, so each
used expert sees one contiguous block of rows: no Python loop over tokens.

Restricted routing (independent-shard mode): `restrict_router(allowed)` limits the router to the
experts a node holds. The logits of all other experts become -inf before the softmax and the top-k,
so the softmax is taken over the allowed experts only (their probabilities sum to 1) and only they
can be chosen. With `normalize_top_k` the k gate weights are then renormalized as usual (softmax
over the k chosen logits); without it they are the chosen experts' probabilities under the softmax
over the allowed experts. An unrestricted layer (the default) runs exactly the ops it always ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mesh_node.engine.experts import ExpertBank, ExpertComputer
from mesh_node.engine.linear import Weight

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
        layout: str = "plain",
    ):
        super().__init__()
        self.gate_up = Weight(gate_up, layout, gate_up_bias)
        self.down = Weight(down, layout, down_bias)
        self.intermediate_size = down.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        inter = self.intermediate_size
        return self.down(F.silu(gate_up[..., :inter]) * gate_up[..., inter:])


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
        layout: str = "plain",
    ):
        super().__init__()
        self.layer = layer
        self.router = Weight(router, layout)  # [E, H]
        self.num_experts = router.shape[0]
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        # mixtral multiplies expert outputs by float32 gate weights; the others cast them first
        self.float_gate_weights = float_gate_weights
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = (
            None if shared_expert_gate is None else Weight(shared_expert_gate, layout)
        )
        self.observer: RoutingObserver | None = None
        # [E] additive router mask: 0 for allowed experts, -inf for the others; None: all allowed
        self.router_mask: torch.Tensor | None = None

    @property
    def allowed_experts(self) -> tuple[int, ...]:
        """The experts the router may choose (all of them unless restricted)."""
        if self.router_mask is None:
            return tuple(range(self.num_experts))
        return tuple(torch.isfinite(self.router_mask).nonzero().flatten().tolist())

    def restrict_router(self, allowed: Iterable[int] | None) -> None:
        """Lets the router choose only `allowed` experts (None: all again); see module doc.

        Raises ValueError for an unknown expert id or fewer allowed experts than top_k.
        """
        if allowed is None:
            self.router_mask = None
            return
        ids = sorted({int(e) for e in allowed})
        bad = [e for e in ids if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(
                f"experts {bad} out of range: layer {self.layer} has {self.num_experts} experts"
            )
        if len(ids) < self.top_k:
            raise ValueError(
                f"layer {self.layer} routes each token to {self.top_k} experts, but only "
                f"{len(ids)} are allowed ({ids}): hold at least {self.top_k} experts per layer"
            )
        if len(ids) == self.num_experts:
            self.router_mask = None  # nothing to mask: keep the unrestricted path's speed
            return
        mask = torch.full(
            (self.num_experts,),
            float("-inf"),
            dtype=self.router.dtype,
            device=self.router.data.device,
        )
        mask[ids] = 0.0
        self.router_mask = mask

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (gate weights [N, k], expert ids [N, k])."""
        logits = self.router(x)
        if self.router_mask is not None:
            return self._route_restricted(x, logits)
        if self.normalize_top_k and self.observer is None:
            # softmax over the top-k logits == top-k of the softmax, renormalized (fewer ops)
            top, chosen = torch.topk(logits, self.top_k, dim=-1)
            weights = torch.softmax(top, dim=-1, dtype=torch.float32)
        else:
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            weights, chosen = torch.topk(probs, self.top_k, dim=-1)
            if self.normalize_top_k:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            if self.observer is not None:
                self.observer(self.layer, probs, chosen, weights)
        if not self.float_gate_weights:
            weights = weights.to(x.dtype)
        return weights, chosen

    def _route_restricted(
        self, x: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.router_mask is not None
        logits = logits + self.router_mask
        # top-k of the logits, not of the probabilities: an allowed expert whose probability
        # underflows to 0 must still win over the masked ones
        top, chosen = torch.topk(logits, self.top_k, dim=-1)
        if self.normalize_top_k and self.observer is None:
            weights = torch.softmax(top, dim=-1, dtype=torch.float32)
        else:
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            weights = probs.gather(-1, chosen)
            if self.normalize_top_k:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            if self.observer is not None:
                self.observer(self.layer, probs, chosen, weights)
        if not self.float_gate_weights:
            weights = weights.to(x.dtype)
        return weights, chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.route(x)
        bank = self.experts
        combined = getattr(bank, "run_combined", None)
        if combined is not None:
            # experts held elsewhere (expert parallelism): the computer returns each token's
            # gate-weighted sum over its k experts, float32
            out = combined(x, chosen, weights.float())
        elif (
            x.shape[0] == 1
            and isinstance(bank, ExpertBank)
            and bank.runs_tokens_whole(self.num_experts)
        ):
            # one token, all experts here: gate/up, activation, down and weighted sum in one call
            out = bank.run_token(x, chosen[0], weights[0].float())
        elif x.shape[0] == 1:
            # one token: its k experts are distinct, so each is one group of one row
            outputs = self.experts.run_grouped(
                x.expand(self.top_k, -1), chosen[0].tolist(), [1] * self.top_k
            )
            out = torch.mm(weights.float(), outputs.float())
        else:
            # sort the (token, k) choices by expert: each used expert gets one block of rows
            flat = chosen.reshape(-1)
            if flat.numel() <= 256:  # decode-sized: sorting a few ids on the host is cheaper
                ids = flat.tolist()
                order_list = sorted(range(len(ids)), key=ids.__getitem__)
                order = torch.tensor(order_list, device=x.device)
                experts, counts = _runs([ids[i] for i in order_list])
            else:
                order = torch.argsort(flat, stable=True)
                per_expert = torch.bincount(flat, minlength=self.num_experts).tolist()
                experts = [e for e, c in enumerate(per_expert) if c]
                counts = [per_expert[e] for e in experts]
            rows = x.index_select(0, order // self.top_k)
            outputs = self.experts.run_grouped(rows, experts, counts)
            # back to (token, k) order, then the gate-weighted sum over each token's k experts
            unsorted = outputs.new_empty(outputs.shape).index_copy_(0, order, outputs)
            unsorted = unsorted.view(-1, self.top_k, shape[-1])
            out = torch.bmm(weights.unsqueeze(1).float(), unsorted.float()).squeeze(1)
        out = out.to(x.dtype)
        if self.shared_expert is not None:
            shared = self.shared_expert.forward(x)
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out.reshape(shape)


def _runs(sorted_ids: list[int]) -> tuple[list[int], list[int]]:
    """[3, 3, 5, 7, 7, 7] -> ([3, 5, 7], [2, 1, 3])."""
    experts: list[int] = []
    counts: list[int] = []
    for expert in sorted_ids:
        if experts and experts[-1] == expert:
            counts[-1] += 1
        else:
            experts.append(expert)
            counts.append(1)
    return experts, counts
