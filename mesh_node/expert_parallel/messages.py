"""Expert-parallel messages (type ids 0x80-0x9F): a host sends hidden-state rows to the peers
holding experts and gets their expert outputs back; peers fetch the rankings a plan uses."""

from __future__ import annotations

from dataclasses import dataclass

from mesh_node.transport.tensors import Tensor


@dataclass(frozen=True, slots=True)
class ExpertCall:
    """Compute experts of one MoE layer, in one of two forms.

    Grouped rows (`token_of` and `weights` absent): `rows [sum(counts), hidden]` are grouped by
    expert: the first `counts[0]` rows go to `experts[0]`, and so on; answered by ExpertOutput
    with the unweighted expert outputs in the same row order, in the rows' dtype.

    Weighted (what hosts send): `rows [T, hidden]` are the distinct tokens sent to this peer,
    each once; `token_of [sum(counts)]` lists, grouped by expert as above, which token each
    (token, expert) pair uses, and `weights` (F32 [sum(counts)]) its gate weight; answered with
    F32 `[T, hidden]`: for each token, the gate-weighted sum of its experts held here (a
    partial of the MoE output, which the host adds up).

    `rows` has the dtype the host runs in, which must be the dtype the peer holds its experts
    in."""

    model: str
    layer: int
    experts: list[int]
    counts: list[int]
    rows: Tensor
    token_of: list[int] | None = None
    weights: Tensor | None = None


@dataclass(frozen=True, slots=True)
class ExpertOutput:
    outputs: Tensor  # grouped: [sum(counts), hidden] in the rows' dtype; weighted: F32 [T, hidden]


@dataclass(frozen=True, slots=True)
class RankingsRequest:
    """Ask a peer for the expert rankings with this digest (the one its plan uses)."""

    model: str
    digest: str


@dataclass(frozen=True, slots=True)
class RankingsData:
    """The rankings document (ExpertRankings.to_bytes(), msgpack; see PROTOCOL.md) as a U8
    tensor [n], so that it travels in the frame's blob: a large model's rankings (co-selection
    tables included) exceed the 1 MiB body limit."""

    document: Tensor

    @classmethod
    def of(cls, data: bytes) -> RankingsData:
        return cls(Tensor("U8", (len(data),), memoryview(data)))

    def data(self) -> bytes:
        if self.document.dtype != "U8" or len(self.document.shape) != 1:
            raise ValueError("a rankings document is a one-dimensional U8 tensor")
        return bytes(self.document.data)


EXPERT_MESSAGES: dict[int, type] = {
    0x80: ExpertCall,
    0x81: ExpertOutput,
    0x82: RankingsRequest,
    0x83: RankingsData,
}
