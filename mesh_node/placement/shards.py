"""Independent-shard mode: which experts each shard node holds, and which shard serves a session.

In independent-shard mode (opt-in, for slow links) every shard node holds the trunk (embeddings,
attention, routers, head), a shared core of each layer's hottest experts, and its own share of the
other experts; its routers may choose only the experts it holds (`LoadPlan(restrict_router=True)`),
so a request never needs another node and no per-token traffic crosses the mesh. The price is
quality: a shard answers with a subset of the experts (measured by `mesh_node.engine.evaluation`).

`plan_shards` is a pure function of the measured expert usage (gate mass per layer and expert):

- core: the `ceil(core_fraction * E)` experts of each layer with the most gate mass, on every shard;
- the other experts of the layer, each on exactly one shard, dealt either
  - "ranked": in rank order, in snake order over the shards (0, 1, .., S-1, S-1, .., 0, 0, 1, ..)
    so that every shard gets a similar mix of hot and cold experts, or
  - "random": in a seeded random order, round robin (the baseline the ranking is measured against).

`shard_for_session` picks a session's shard by rendezvous (highest-random-weight) hashing: every
node computes the same answer from the same shard list, and adding a shard moves only the sessions
that the new shard wins (about 1/S of them); removing one moves only that shard's sessions.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ASSIGNMENTS = ("ranked", "random")

GateMass = Mapping[int, Sequence[float]] | Sequence[Sequence[float]]


@dataclass(frozen=True)
class ShardPlan:
    """The experts of every shard. `core[i]` and `owned[s][i]` belong to MoE layer `layers[i]`."""

    layers: tuple[int, ...]
    num_experts: int
    num_shards: int
    core_fraction: float
    assignment: str
    seed: int
    core: tuple[tuple[int, ...], ...]  # per layer: the hottest experts, held by every shard
    owned: tuple[tuple[tuple[int, ...], ...], ...]  # per shard, per layer: its own experts

    def experts(self, shard_index: int) -> dict[int, tuple[int, ...]]:
        """layer -> the sorted experts shard `shard_index` holds (core + its own); pass it to
        `LoadPlan(experts=..., restrict_router=True)`."""
        if not 0 <= shard_index < self.num_shards:
            raise IndexError(f"shard {shard_index} out of range: the plan has {self.num_shards}")
        return {
            layer: tuple(sorted(self.core[i] + self.owned[shard_index][i]))
            for i, layer in enumerate(self.layers)
        }

    def core_experts(self, layer: int) -> tuple[int, ...]:
        return self.core[self.layers.index(layer)]

    @property
    def fingerprint(self) -> str:
        """Same plan, same fingerprint, on every node (compare before trusting a peer's shard)."""
        h = hashlib.sha256()
        h.update(
            f"shards/1:{self.num_experts}:{self.num_shards}:{self.core_fraction!r}:"
            f"{self.assignment}:{self.seed}".encode()
        )
        for i, layer in enumerate(self.layers):
            h.update(f"|{layer}:{','.join(map(str, self.core[i]))}".encode())
            for shard in self.owned:
                h.update(f";{','.join(map(str, shard[i]))}".encode())
        return h.hexdigest()[:16]


def _per_layer(gate_mass: GateMass) -> dict[int, list[float]]:
    if isinstance(gate_mass, Mapping):
        rows = {int(layer): [float(m) for m in row] for layer, row in gate_mass.items()}
    else:
        rows = {layer: [float(m) for m in row] for layer, row in enumerate(gate_mass)}
    if not rows:
        raise ValueError("gate_mass has no layers")
    sizes = {len(row) for row in rows.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every layer needs the same non-zero number of experts, got {sizes}")
    for layer, row in rows.items():
        if not all(math.isfinite(m) for m in row):
            raise ValueError(f"gate mass of layer {layer} is not finite")
    return dict(sorted(rows.items()))


def _deal(rest: list[int], num_shards: int, assignment: str, rng: random.Random) -> list[list[int]]:
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    if assignment == "random":
        rest = list(rest)
        rng.shuffle(rest)
        for i, expert in enumerate(rest):
            shards[i % num_shards].append(expert)
        return shards
    for i, expert in enumerate(rest):  # snake: hot and cold experts spread evenly
        round_, position = divmod(i, num_shards)
        shards[position if round_ % 2 == 0 else num_shards - 1 - position].append(expert)
    return shards


def plan_shards(
    gate_mass: GateMass,
    num_shards: int,
    core_fraction: float = 0.25,
    assignment: str = "ranked",
    seed: int = 0,
    *,
    top_k: int = 1,
) -> ShardPlan:
    """Splits each MoE layer's experts over `num_shards` shards (see module doc).

    gate_mass: per layer, each expert's measured gate mass (`ExpertUsage.gate_mass` rows), as a
    mapping layer -> masses or a sequence indexed by layer. Experts are ranked by mass, ties by
    id. top_k: the model's experts per token; every shard must hold at least that many experts in
    every layer, or ValueError (fewer shards or a larger core_fraction fix it). `seed` only
    matters for the "random" assignment.
    """
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"unknown assignment {assignment!r}: use one of {ASSIGNMENTS}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    if not 0.0 <= core_fraction <= 1.0:
        raise ValueError(f"core_fraction must be within [0, 1], got {core_fraction}")
    rows = _per_layer(gate_mass)
    num_experts = len(next(iter(rows.values())))
    core_size = math.ceil(core_fraction * num_experts)
    core: list[tuple[int, ...]] = []
    owned: list[list[tuple[int, ...]]] = [[] for _ in range(num_shards)]
    for layer, mass in rows.items():
        ranking = sorted(range(num_experts), key=lambda e: (-mass[e], e))
        rng = random.Random(f"mesh-node shards {seed} {layer}")
        dealt = _deal(ranking[core_size:], num_shards, assignment, rng)
        smallest = core_size + min(len(d) for d in dealt)
        if smallest < top_k:
            raise ValueError(
                f"layer {layer}: a shard would hold only {smallest} experts ({core_size} core + "
                f"{smallest - core_size} own of {num_experts}) but each token uses {top_k}; "
                f"use fewer shards or a larger core_fraction"
            )
        core.append(tuple(sorted(ranking[:core_size])))
        for shard, experts in enumerate(dealt):
            owned[shard].append(tuple(sorted(experts)))
    return ShardPlan(
        layers=tuple(rows),
        num_experts=num_experts,
        num_shards=num_shards,
        core_fraction=core_fraction,
        assignment=assignment,
        seed=seed,
        core=tuple(core),
        owned=tuple(tuple(s) for s in owned),
    )


def _weight(shard_id: str, session_key: str) -> bytes:
    return hashlib.sha256(f"{shard_id}\x00{session_key}".encode()).digest()


def shard_for_session(session_key: str, shard_ids: Sequence[str]) -> str:
    """The shard (one of `shard_ids`) that serves `session_key`: rendezvous hashing with sha256,
    independent of the list's order; adding a shard moves only the sessions it wins."""
    if not shard_ids:
        raise ValueError("no shards to route the session to")
    return max(shard_ids, key=lambda shard: (_weight(shard, session_key), shard))
