"""Expert banks: the routed experts of one MoE layer (all of them or a subset), stacked.

The MoE layer (`mesh_node.engine.moe.MoELayer`) routes; the bank only computes. Its one entry point,
`run_grouped(rows, experts, counts)`, takes hidden-state rows already sorted by expert (the first
`counts[0]` rows go to `experts[0]`, and so on) and returns each row's expert output, unweighted.
One matmul per used expert for the fused gate/up projection and one for the down projection; the
weights are indexed as views (`gate_up[j]`), never gathered or copied per token.

Anything with the same `run_grouped` method (the `ExpertComputer` protocol) can stand in for a bank:
expert parallelism plugs in a dispatcher that runs the held experts locally and sends the rows of
the others to the peers holding them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from mesh_node.engine import cpu_kernels
from mesh_node.engine.errors import EngineError
from mesh_node.engine.linear import WeightStack


@runtime_checkable
class ExpertComputer(Protocol):
    """Computes given experts of one layer for given (expert-grouped) hidden-state rows."""

    layer: int

    def run_grouped(
        self, rows: torch.Tensor, experts: Sequence[int], counts: Sequence[int]
    ) -> torch.Tensor:
        """rows [sum(counts), hidden] grouped by expert -> expert outputs [sum(counts), hidden]."""
        ...


class ExpertNotLoadedError(EngineError):
    """A token was routed to an expert that this bank does not hold."""


class ExpertBank(nn.Module):
    """Some of one layer's experts: `gate_up [n, 2I, H]` (gate rows first), `down [n, H, I]`.

    The stacks are kept in the layout that multiplies fastest here (see `linear.WeightStack`);
    `gate_up.dense(j)` and `down.dense(j)` give expert `expert_ids[j]`'s matrices back.
    """

    def __init__(
        self,
        layer: int,
        expert_ids: Sequence[int],
        gate_up: torch.Tensor,
        down: torch.Tensor,
        layout: str = "plain",
    ):
        super().__init__()
        if gate_up.shape[0] != len(expert_ids) or down.shape[0] != len(expert_ids):
            raise ValueError("one stacked weight per expert id is required")
        self.layer = layer
        self.expert_ids = tuple(int(e) for e in expert_ids)
        self._position = {e: j for j, e in enumerate(self.expert_ids)}
        self.intermediate_size = down.shape[-1]
        self.dtype = gate_up.dtype
        self.device = gate_up.device
        self.gate_up = WeightStack(gate_up, layout)
        self.down = WeightStack(down, layout)

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def holds(self, expert: int) -> bool:
        return expert in self._position

    def subset(self, expert_ids: Sequence[int]) -> ExpertBank:
        """A new bank of some of these experts (copies their weights; this bank is unchanged)."""
        missing = [e for e in expert_ids if e not in self._position]
        if missing:
            raise ExpertNotLoadedError(f"experts {missing} of layer {self.layer} are not here")
        ids = sorted(set(int(e) for e in expert_ids))
        positions = [self._position[e] for e in ids]
        gate_up = torch.stack([self.gate_up.dense(j) for j in positions])
        down = torch.stack([self.down.dense(j) for j in positions])
        return ExpertBank(self.layer, ids, gate_up, down, self.gate_up.layout)

    def run_weighted(
        self,
        rows: torch.Tensor,
        experts: Sequence[int],
        counts: Sequence[int],
        token_of: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """Gate-weighted partial sums: the grouped rows are `rows[token_of]` (token_of [M],
        M = sum(counts), grouped by expert as in `run_grouped`), weights [M] float32; returns
        [rows.shape[0], H] float32 where row t = sum of weights[i] * expert_i(rows[t]) over the
        i with token_of[i] == t (what a peer answers for the tokens it was sent).

        One token on native kernels (a decode step's call) takes one fused kernel call
        (`cpu_kernels.moe_token`, float32 sum) instead of a few torch ops per expert: the same
        roundings, ~170 us less per call here (one thread, 8 of 64 OLMoE-sized experts)."""
        one_token = rows.shape[0] == 1 and bool(counts) and all(count == 1 for count in counts)
        if one_token and self.gate_up.layout == "native" and rows.dtype == self.gate_up.dtype:
            positions = [self._position.get(expert) for expert in experts]
            if None not in positions:
                return cpu_kernels.moe_token(
                    rows,
                    self.gate_up.data,
                    self.down.data,
                    torch.tensor(positions, dtype=torch.long),
                    weights.float(),
                    float_sum=True,
                )
        if one_token:
            # one token (a decode step's call on other layouts): its experts' outputs, each
            # weighted in float32 and added up in order, as index_add_ would, in fewer ops
            terms = (
                self._expert(self._index(expert), rows).float() * weight
                for expert, weight in zip(experts, weights.tolist(), strict=True)
            )
            partial = next(terms)
            for term in terms:
                partial.add_(term)
            return partial
        outputs = self.run_grouped(rows.index_select(0, token_of), experts, counts)
        partial = torch.zeros(rows.shape[0], rows.shape[1], dtype=torch.float32, device=rows.device)
        return partial.index_add_(0, token_of, outputs.float() * weights.unsqueeze(1))

    def merged(self, other: ExpertBank) -> ExpertBank:
        """A new bank of this bank's experts and `other`'s (same layer, no expert in both)."""
        both = set(self.expert_ids) & set(other.expert_ids)
        if both or other.layer != self.layer:
            raise ValueError(f"cannot merge: experts {sorted(both)} in both, or other layers")
        sources = sorted(
            [(e, self, j) for j, e in enumerate(self.expert_ids)]
            + [(e, other, j) for j, e in enumerate(other.expert_ids)]
        )
        gate_up = torch.stack([bank.gate_up.dense(j) for _, bank, j in sources])
        down = torch.stack([bank.down.dense(j) for _, bank, j in sources])
        return ExpertBank(
            self.layer, [e for e, _, _ in sources], gate_up, down, self.gate_up.layout
        )

    def runs_tokens_whole(self, num_experts: int) -> bool:
        """True when `run_token` works: native kernels and all `num_experts` experts held, in
        order (position j is expert j)."""
        return self.gate_up.layout == "native" and self.expert_ids == tuple(range(num_experts))

    def run_token(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """One token's experts in one native call: x [1, H], experts [k] (ids), weights [k]
        float32 -> sum_j weights[j] * expert_j(x), [1, H] (see `runs_tokens_whole`)."""
        return cpu_kernels.moe_token(x, self.gate_up.data, self.down.data, experts, weights)

    def _index(self, expert: int) -> int:
        """The expert's position in the stacks; ExpertNotLoadedError when it is not here."""
        j = self._position.get(expert)
        if j is None:
            raise ExpertNotLoadedError(
                f"expert {expert} of layer {self.layer} is not loaded here "
                f"(this bank holds {len(self.expert_ids)} experts: {list(self.expert_ids)[:16]}"
                f"{'...' if len(self.expert_ids) > 16 else ''})"
            )
        return j

    def _expert(self, j: int, rows: torch.Tensor) -> torch.Tensor:
        """The expert at stack position j on these rows: gate/up, SiLU gate, down."""
        gate_up = self.gate_up.apply(j, rows)
        inter = self.intermediate_size
        return self.down.apply(j, F.silu(gate_up[:, :inter]) * gate_up[:, inter:])

    def run_grouped(
        self, rows: torch.Tensor, experts: Sequence[int], counts: Sequence[int]
    ) -> torch.Tensor:
        pieces = []
        start = 0
        for expert, count in zip(experts, counts, strict=True):
            if not count:
                continue
            end = start + count
            pieces.append(self._expert(self._index(expert), rows[start:end]))
            start = end
        if not pieces:
            return rows.new_empty(rows.shape)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
