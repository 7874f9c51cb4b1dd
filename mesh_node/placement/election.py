"""Host election per model.

A node is eligible to host a model when it is live (alive or suspect: a suspicion alone does
not move a model), is not a client, has the model on disk, and has room for it: free memory
(the freest GPU's free VRAM on a node with GPUs, else free RAM) at least `headroom` times the
model's bytes, counting the copy a current host already holds as free.

A model split across the mesh (expert parallelism) is hosted by one node (`max_hosts=1`),
and its size for the room check is the trunk's (what the host itself loads).

The number of hosts follows demand: one, plus one more while the current hosts average at
least `busy_inflight` requests in flight, minus one while they average under
`idle_inflight` (never below one, never above the eligible nodes).

Which nodes: current hosts first (a host whose plan is unchanged keeps serving; nothing
restarts), then by total memory, largest first, in GiB (static, so nodes do not flap as
free memory moves), then by node id. Same inputs, same answer, on every node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

from mesh_node.identity import NodeId

GIB = 1 << 30
HEADROOM = 1.1  # a host needs free memory of at least this many times the model's bytes


@dataclass(frozen=True, slots=True)
class NodeView:
    """What election needs to know about one node (from its gossiped state)."""

    node_id: NodeId
    live: bool
    role: str
    memory_total: int
    memory_free: int
    models_on_disk: dict[str, int]  # model name -> bytes
    models_served: frozenset[str]
    inflight: int = 0


@dataclass(frozen=True, slots=True)
class Election:
    model: str
    hosts: tuple[NodeId, ...]  # in preference order
    eligible: tuple[NodeId, ...]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.model.encode())
        for node_id in self.hosts:
            h.update(node_id.key)
        return h.hexdigest()[:16]


def fits(node: NodeView, model: str, headroom: float) -> bool:
    size = node.models_on_disk.get(model)
    if size is None:
        return False
    held = size if model in node.models_served else 0
    # in integers (headroom as a fraction): every implementation decides alike at the edge
    ratio = Fraction(headroom).limit_denominator(1000)
    return (node.memory_free + held) * ratio.denominator >= ratio.numerator * size


def elect(
    model: str,
    nodes: Iterable[NodeView],
    *,
    headroom: float = HEADROOM,
    busy_inflight: float = 4.0,
    idle_inflight: float = 1.0,
    max_hosts: int | None = None,
) -> Election:
    eligible = sorted(
        (n for n in nodes if n.live and n.role != "client" and fits(n, model, headroom)),
        key=lambda n: n.node_id,
    )
    current = [n for n in eligible if model in n.models_served]
    count = max(1, len(current))
    if current:
        average = sum(n.inflight for n in current) / len(current)
        if average >= busy_inflight:
            count += 1
        elif average < idle_inflight and count > 1:
            count -= 1
    others = sorted(
        (n for n in eligible if model not in n.models_served),
        key=lambda n: (-(n.memory_total // GIB), n.node_id),
    )
    ranked = current + others
    if max_hosts is not None:
        count = min(count, max_hosts)
    hosts = tuple(n.node_id for n in ranked[: min(count, len(ranked))])
    return Election(model, hosts, tuple(n.node_id for n in eligible))
