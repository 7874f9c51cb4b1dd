"""Expert placement plan: which peer holds which routed experts of which MoE layer.

A pure function of gossiped state (the peers' offers, the rankings as plain numbers, the
model's expert size): every node computes the same plan and the same fingerprint, so the
mesh agrees without voting. The host keeps the trunk (embeddings, attention, norms,
routers, output head); the caller subtracts it from the host's offer. Here only routed
experts are placed, all of one size (`expert_bytes`), in whole experts ("copies").

The algorithm, step by step (peers sorted by node id, layers ascending, integers where a
tie could go either way, so the same inputs give the same plan everywhere):

1. Capacity. A peer holds `budget // expert_bytes` copies. Every (layer, expert) needs one
   copy; if the sum of the capacities is smaller, `PlanError` says how many bytes miss.
2. Replicas. In each layer the hottest `ceil(replicate_fraction * num_experts)` experts by
   gate mass (ties: lower id) want `min_replicas` copies on distinct peers (fewer when
   fewer peers have room). As many extra copies as the spare capacity allows are counted
   in the targets; which ones get placed is step 4's.
3. Targets. The N copies to place are split among peers proportionally to their budgets
   (largest-remainder apportionment in exact integers, water-filled under each peer's
   capacity), and the first copies (one per expert) in proportion to those targets. Then,
   per layer, who holds its first copies (`_first_copy_quotas`). Peers are grouped by the
   machine they run on (`PeerOffer.machine`). Layer by layer, each layer is split among the
   machines in proportion to the first copies their peers have left to hold (so every
   layer is spread about alike): peers on separate machines compute a token's experts at once,
   each reading its own memory. Within a machine, its part of a layer goes to one peer
   where it can: peers sharing a machine share its memory bandwidth, so splitting a layer
   among them buys nothing, and a layer part held by one peer costs a token at most one
   call (none on the host). Each peer other than the host takes whole layer parts and its
   remainder in one part it shares with the host, which takes the rest; when the host is
   on another machine, or its share cannot cover the shared parts, the machine's peers
   take runs of layer parts in turn (a part may then be split among several peers).
4. Greedy placement. First copies layer by layer, experts hottest first, each to a peer
   with room left in that layer's quota, preferring:
   a. affinity: the co-selection mass between this expert and the experts the peer
      already holds in this layer (where a layer is shared: experts chosen together land
      together, and a token needs fewer remote peers);
   b. the host, for the hot experts;
   c. the most room left in the layer quota, then the lower node id.
   Then the replicas, hottest first across all layers (by gate mass, then layer, then
   expert), each on a peer with capacity left that does not hold the expert yet: on a
   machine without a copy where there is one (a machine that fails takes all its peers),
   below its target where there is one, the one furthest below first (then affinity, the
   host for hot experts, node id). When every peer with room holds the expert already, a
   full peer without it swaps: it hands one of its copies to a peer with room that does not
   hold that one, and takes the replica (`swap_in` says which copy and where; chiefly a cold
   one, to a peer holding part of its layer already, such as the host, so no token calls
   more peers). A replica with no such swap is dropped; a hot expert left with fewer than
   `min_replicas` holders is listed in `ExpertPlan.unreplicated`. Whenever the capacities
   allow every hot expert its `min_replicas` copies on distinct peers, it has them.
5. Balance. A replica on a peer above its target moves to a peer below its target that
   can take it without its copies spanning fewer machines (a peer can be left with room
   only for replicas of its own layers). A peer usually ends within a few experts of
   `N * budget / sum(budgets)`, but replicas, which must sit on distinct peers, can fill a
   peer past its target up to its capacity: with two peers whose hot experts' first copies
   the host took, every replica goes to the other peer (with two peers of 640 experts'
   room, 16 layers x 64 experts: 512 and 640 against 576 each).

`coselection`, when given, is per layer a symmetric E x E matrix of how often two experts
are chosen for the same token (any scale; the diagonal is ignored). Without it there is no
affinity and a shared layer's hot experts go to the host first.

The fingerprint covers model, host, demand digest, expert size and assignments (peers
holding nothing are left out, so an idle peer joining changes nothing). `to_wire` /
`from_wire` carry the plan as plain types; `from_wire` re-checks every invariant.
`expected_remote_peers` estimates the distinct non-host peers a token contacts per MoE
layer for a plan; `planned_budget` rounds an offer to what plans count (callers pass offers
rounded so, and recompute the plan whenever the rounded offers change).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

import numpy as np

from mesh_node.identity import NodeId

SYMMETRY_TOLERANCE = 1e-6  # relative; coselection[i][j] and [j][i] may differ by float noise
MAX_INDEX = (1 << 32) - 1  # largest layer index / expert id
MAX_BYTES = (1 << 63) - 1  # largest budget / expert size
MAX_MACHINE = 64  # characters of a machine label
BUDGET_BITS = 5  # significant bits of a budget that plans count (`planned_budget`)


class PlanError(ValueError):
    """Inputs (or a received plan) from which no valid plan can be made; says why."""


@dataclass(frozen=True, slots=True)
class PeerOffer:
    node_id: NodeId
    budget: int  # bytes this peer offers for routed experts (the host's: trunk subtracted)
    machine: str = ""  # the machine it runs on (PeerState.machine); "": one of its own


@dataclass(frozen=True, slots=True)
class ExpertDemand:
    """What the rankings say, as plain numbers."""

    layers: tuple[int, ...]  # MoE layer indices
    num_experts: int
    expert_bytes: int  # bytes of one routed expert (all experts the same size)
    gate_mass: tuple[tuple[float, ...], ...]  # [len(layers)][num_experts], hotter = larger
    coselection: tuple[tuple[tuple[float, ...], ...], ...] | None = None  # per layer E x E
    rankings_digest: str = ""  # identifies the rankings (goes into the demand digest)


@dataclass(frozen=True)
class ExpertPlan:
    """node -> layer -> sorted expert ids. Every offered node is present (maybe holding
    nothing) and every node lists every planned layer (maybe with no experts)."""

    model: str
    host: NodeId
    assignments: Mapping[NodeId, Mapping[int, tuple[int, ...]]]
    demand_digest: str
    expert_bytes: int = 0
    budgets: Mapping[NodeId, int] = field(default_factory=lambda: MappingProxyType({}))
    unreplicated: tuple[tuple[int, int], ...] = ()  # hot (layer, expert) short of replicas

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    @cached_property
    def _holders(self) -> dict[tuple[int, int], tuple[NodeId, ...]]:
        index: dict[tuple[int, int], list[NodeId]] = {}
        for node in _preference_order(self.assignments, self.host):
            for layer, experts in self.assignments[node].items():
                for expert in experts:
                    index.setdefault((layer, expert), []).append(node)
        return {key: tuple(nodes) for key, nodes in index.items()}

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for m in self.assignments.values() for layer in m}))

    @property
    def num_experts(self) -> int:
        return 1 + max((e for _, e in self._holders), default=-1)

    def holders(self, layer: int, expert: int) -> tuple[NodeId, ...]:
        """Nodes holding the expert, in preference order: the host first, then by id."""
        return self._holders.get((layer, expert), ())

    def experts_of(self, node: NodeId) -> Mapping[int, tuple[int, ...]]:
        return self.assignments.get(node, MappingProxyType({}))

    def bytes_of(self, node: NodeId) -> int:
        return self.expert_bytes * sum(len(e) for e in self.experts_of(node).values())

    def covered(
        self, node: NodeId, published: Mapping[NodeId, Mapping[int, Iterable[int]]]
    ) -> set[tuple[int, int]]:
        """(layer, expert) that a node other than `node` both holds in this plan and publishes
        holding (`published`: node -> layer -> experts): what `node` may give up without
        leaving an expert uncovered. A node that publishes an expert this plan moves away from
        it does not count: it may be giving that expert up at the same moment."""
        return {
            (layer, expert)
            for other, layers in published.items()
            if other != node
            for layer, experts in layers.items()
            for expert in experts
            if other in self._holders.get((layer, expert), ())
        }

    def replicated(self) -> list[tuple[int, int]]:
        """(layer, expert) pairs with at least two holders, sorted."""
        return sorted(key for key, nodes in self._holders.items() if len(nodes) >= 2)

    @cached_property
    def fingerprint(self) -> str:
        """16 hex chars over model, host, demand digest, expert size and the assignments
        (nodes holding nothing are left out, so a peer offering nothing changes nothing)."""
        h = hashlib.sha256(b"expert-plan/2\0")
        h.update(self.model.encode() + b"\0")
        h.update(self.host.key)
        h.update(self.demand_digest.encode() + b"\0")
        h.update(struct.pack("<Q", self.expert_bytes))
        for node in sorted(self.assignments):
            held = self.assignments[node]
            if not any(held.values()):
                continue
            h.update(b"N" + node.key)
            for layer in sorted(held):
                h.update(struct.pack("<QQ", layer, len(held[layer])))
                h.update(struct.pack(f"<{len(held[layer])}Q", *held[layer]))
        return h.hexdigest()[:16]

    def to_dict(self) -> dict:
        """JSON-able status (for /api/status and the status page)."""
        total_budget = sum(self.budgets.values())
        total_bytes = sum(self.bytes_of(node) for node in self.assignments)
        nodes = []
        for node in _preference_order(self.assignments, self.host):
            held = self.assignments[node]
            budget = self.budgets.get(node, 0)
            node_bytes = self.bytes_of(node)
            nodes.append(
                {
                    "node_id": str(node),
                    "short": node.short,
                    "host": node == self.host,
                    "experts": {str(layer): list(held[layer]) for layer in sorted(held)},
                    "count": sum(len(e) for e in held.values()),
                    "bytes": node_bytes,
                    "budget": budget,
                    "budget_share": budget / total_budget if total_budget else 0.0,
                    "bytes_share": node_bytes / total_bytes if total_bytes else 0.0,
                }
            )
        return {
            "model": self.model,
            "host": str(self.host),
            "fingerprint": self.fingerprint,
            "demand_digest": self.demand_digest,
            "layers": list(self.layers),
            "num_experts": self.num_experts,
            "expert_bytes": self.expert_bytes,
            "total_bytes": total_bytes,
            "nodes": nodes,
            "replicas": [
                {
                    "layer": layer,
                    "expert": expert,
                    "holders": [str(n) for n in self.holders(layer, expert)],
                }
                for layer, expert in self.replicated()
            ],
            "unreplicated": [[layer, expert] for layer, expert in self.unreplicated],
        }

    def to_wire(self) -> dict:
        """Plain msgpack-able types; node ids as their 32 raw bytes. Per node: id, budget,
        and one sorted expert list per entry of `layers`."""
        layers = self.layers
        return {
            "model": self.model,
            "host": self.host.key,
            "demand_digest": self.demand_digest,
            "expert_bytes": self.expert_bytes,
            "layers": list(layers),
            "nodes": [
                [
                    node.key,
                    self.budgets.get(node, 0),
                    [list(self.assignments[node].get(layer, ())) for layer in layers],
                ]
                for node in sorted(self.assignments)
            ],
            "unreplicated": [[layer, expert] for layer, expert in self.unreplicated],
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_wire(cls, d: object) -> ExpertPlan:
        """Validate and rebuild a plan from `to_wire`'s form. Raises PlanError (only) on
        anything malformed: wrong types, an expert nobody holds, a node over its budget,
        a fingerprint that does not match. Unknown keys are ignored."""
        if not isinstance(d, Mapping):
            raise PlanError("a wire plan is a map")
        model = _wire_field(d, "model", str)
        host = _wire_node(_wire_field(d, "host", bytes))
        demand_digest = _wire_field(d, "demand_digest", str)
        expert_bytes = _wire_int(_wire_field(d, "expert_bytes", int), "expert_bytes", 1, MAX_BYTES)
        layers = _wire_sorted_ints(_wire_field(d, "layers", (list, tuple)), "layers")
        if not layers:
            raise PlanError("a wire plan has at least one layer")
        budgets: dict[NodeId, int] = {}
        assignments: dict[NodeId, dict[int, tuple[int, ...]]] = {}
        for entry in _wire_field(d, "nodes", (list, tuple)):
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise PlanError("a wire plan node is [id, budget, experts per layer]")
            raw_id, budget, per_layer = entry
            if not isinstance(raw_id, bytes):
                raise PlanError("a wire plan node id is bytes")
            node = _wire_node(raw_id)
            if node in budgets:
                raise PlanError(f"node {node.short} appears twice in the plan")
            budgets[node] = _wire_int(budget, "budget", 0, MAX_BYTES)
            if not isinstance(per_layer, (list, tuple)) or len(per_layer) != len(layers):
                raise PlanError("a wire plan node lists one expert list per layer")
            assignments[node] = {
                layer: _wire_sorted_ints(experts, "experts")
                for layer, experts in zip(layers, per_layer, strict=True)
            }
            if len(_flat(assignments[node])) * expert_bytes > budgets[node]:
                raise PlanError(f"node {node.short} holds more than its budget")
        if host not in assignments:
            raise PlanError("the host is not among the plan's nodes")
        num_experts = 0
        for layer in layers:
            held = sorted({e for node in assignments for e in assignments[node][layer]})
            if not held or held != list(range(len(held))):
                raise PlanError(f"layer {layer}: the experts held are not 0..E-1")
            if num_experts and len(held) != num_experts:
                raise PlanError("layers differ in their number of experts")
            num_experts = len(held)
        unreplicated = []
        for pair in _wire_field(d, "unreplicated", (list, tuple)):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise PlanError("an unreplicated entry is [layer, expert]")
            layer, expert = (_wire_int(x, "unreplicated", 0) for x in pair)
            if layer not in layers or expert >= num_experts:
                raise PlanError("an unreplicated entry names no planned expert")
            unreplicated.append((layer, expert))
        if len(set(unreplicated)) != len(unreplicated):
            raise PlanError("an unreplicated entry appears twice")
        plan = _make_plan(
            model, host, assignments, demand_digest, expert_bytes, budgets, unreplicated
        )
        fingerprint = d.get("fingerprint")
        if fingerprint is not None and fingerprint != plan.fingerprint:
            raise PlanError("the plan's fingerprint does not match its content")
        return plan


def plan_experts(
    model: str,
    host: NodeId,
    peers: Sequence[PeerOffer],
    demand: ExpertDemand,
    *,
    replicate_fraction: float = 0.125,
    min_replicas: int = 2,
) -> ExpertPlan:
    """Place every routed expert of `demand` on `peers` (see the module docstring)."""
    if not isinstance(model, str):
        raise PlanError("the model name is a string")
    if not isinstance(host, NodeId):
        raise PlanError("the host is a NodeId")
    offers = _normalize_peers(peers)
    if host not in offers:
        raise PlanError(f"the host {host.short} is not among the peers offering memory")
    _check_fraction(replicate_fraction)
    if type(min_replicas) is not int or min_replicas < 1:
        raise PlanError("min_replicas is an integer of at least 1")
    layers, gate, cosel = _check_demand(demand)

    nodes = sorted(offers)
    budgets = [offers[n] for n in nodes]
    host_index = nodes.index(host)
    num_layers, num_experts, size = len(layers), demand.num_experts, demand.expert_bytes
    capacity = [b // size for b in budgets]
    needed = num_layers * num_experts
    if sum(capacity) < needed:
        usable = sum(capacity) * size
        raise PlanError(
            f"the experts do not fit: {num_layers} layers x {num_experts} experts x "
            f"{size} bytes need {needed * size} bytes, the peers offer {usable} usable bytes "
            f"(of {sum(budgets)}); {needed * size - usable} bytes are missing"
        )

    # 2. the hot experts, hottest first: each wants `want - 1` extra copies (replicas)
    order = [sorted(range(num_experts), key=lambda e, g=g: (-g[e], e)) for g in gate]
    hot_count = math.ceil(round(replicate_fraction * num_experts, 9))
    want = min(min_replicas, sum(1 for c in capacity if c > 0))
    hot = sorted((-gate[li][e], li, e) for li in range(num_layers) for e in order[li][:hot_count])
    total = needed + min((want - 1) * len(hot), sum(capacity) - needed)

    # 3. targets: overall, then for the first copy of every expert, per layer: spread over
    # machines, in whole layer parts within a machine (_first_copy_quotas)
    target = _apportion(total, budgets, capacity)
    machines = _machines(peers)
    machine_at = [machines[n] for n in nodes]
    first_copies = _first_copy_quotas(
        _apportion(needed, target, target), host_index, machine_at, num_layers, num_experts
    )

    # 4. greedy placement: first copies layer by layer, then replicas hottest first
    slots = list(capacity)
    placed = [0] * len(nodes)
    held: list[list[set[int]]] = [[set() for _ in range(num_layers)] for _ in nodes]
    affinity = [np.zeros((len(nodes), num_experts)) for _ in layers] if cosel is not None else None

    def place(li: int, e: int, pool: list[int], room: list[int], replica: bool) -> int:
        """Put a copy of expert e of layer li on the best node of `pool`: a first copy
        with the experts chosen with it, a hot one on the host, else where most room is
        left; a replica where most room is left (then the same)."""
        near = affinity[li][:, e] if affinity is not None else np.zeros(len(nodes))
        on_host = e in order[li][:hot_count]
        p = min(
            (
                -room[p] if replica else 0,
                -float(near[p]),
                -(on_host and p == host_index),
                -room[p],
                p,
            )
            for p in pool
        )[-1]
        held[p][li].add(e)
        slots[p] -= 1
        placed[p] += 1
        if affinity is not None:
            affinity[li][p] += cosel[li][e]
        return p

    hot_set = {(lx, x) for _, lx, x in hot}

    def swap_in(li: int, e: int) -> bool:
        """Make room for a replica of expert e of layer li when every node with room holds it
        already: a full node q without it hands a copy (lx, x) to a node p with room that does
        not hold x, and takes the replica. Preferred, in this order: q on a machine without a
        copy of e; a layer p holds some of already (p's calls stay as they are: the host's part
        of a layer costs no call), the one q holds least of (q gives up a part of a layer rather
        than cut another: a layer it shares with the host empties first); a cold copy, the
        coldest; p keeping x's copies on as many machines; the host."""
        receivers = [p for p in range(len(nodes)) if slots[p]]
        donors = [q for q in range(len(nodes)) if capacity[q] and not slots[q]]
        donors = [q for q in donors if e not in held[q][li]]
        if not receivers or not donors:
            return False
        copied = {machine_at[p] for p in range(len(nodes)) if e in held[p][li]}
        best = None
        for q in donors:
            for p in receivers:
                for lx in range(num_layers):
                    movable = held[q][lx] - held[p][lx]
                    if not movable:
                        continue
                    x = min(movable, key=lambda x, lx=lx: ((lx, x) in hot_set, gate[lx][x], x))
                    holders = [o for o in range(len(nodes)) if x in held[o][lx]]
                    kept = {machine_at[o] for o in holders if o != q} | {machine_at[p]}
                    narrower = len(kept) < len({machine_at[o] for o in holders})
                    key = (
                        machine_at[q] in copied,
                        not held[p][lx],
                        len(held[q][lx]),
                        (lx, x) in hot_set,
                        gate[lx][x],
                        narrower,
                        p != host_index,
                        lx,
                        x,
                        q,
                        p,
                    )
                    best = key if best is None else min(best, key)
        if best is None:
            return False
        *_, lx, x, q, p = best
        move(lx, x, q, p)
        place(li, e, [q], [0] * len(nodes), True)
        return True

    def move(lx: int, x: int, q: int, p: int) -> None:
        """Move q's copy of expert x of layer lx to p."""
        held[q][lx].remove(x)
        held[p][lx].add(x)
        slots[p], placed[p] = slots[p] - 1, placed[p] + 1
        slots[q], placed[q] = slots[q] + 1, placed[q] - 1
        if affinity is not None:
            affinity[lx][q] -= cosel[lx][x]
            affinity[lx][p] += cosel[lx][x]

    for li in range(num_layers):
        room = first_copies[li]
        for e in order[li]:
            pool = [p for p in range(len(nodes)) if room[p] > 0]
            room[place(li, e, pool, room, replica=False)] -= 1
    unreplicated = []
    for _, li, e in hot:
        for _ in range(want - 1):
            candidates = [p for p in range(len(nodes)) if slots[p] and e not in held[p][li]]
            if not candidates:
                if swap_in(li, e):
                    continue
                break  # no distinct peer with room left, not even by a swap: dropped
            # on a machine without a copy where there is one (a machine that fails takes all
            # its nodes), then below its target where there is one
            copied = {machine_at[p] for p in range(len(nodes)) if e in held[p][li]}
            pool = [p for p in candidates if machine_at[p] not in copied] or candidates
            room = [t - n for t, n in zip(target, placed, strict=True)]
            place(li, e, [p for p in pool if room[p] > 0] or pool, room, True)
        if sum(e in held[p][li] for p in range(len(nodes))) < min_replicas:
            unreplicated.append((layers[li], e))
    # 5. a replica whose node is above its target moves to a node below its target (a node
    # can be left with room only for replicas of the layers it holds itself), where its
    # copies stay on as many machines
    for _, li, e in hot:
        holders = [p for p in range(len(nodes)) if e in held[p][li]]
        over = [p for p in holders if placed[p] > target[p]]
        under = [
            p for p in range(len(nodes)) if placed[p] < target[p] and slots[p] and p not in holders
        ]
        if len(holders) < 2 or not over or not under:
            continue
        src = min(over, key=lambda p: (target[p] - placed[p], p))
        spread = len({machine_at[p] for p in holders})
        kept = {machine_at[p] for p in holders if p != src}
        under = [p for p in under if len(kept | {machine_at[p]}) >= spread]
        if under:
            move(li, e, src, min(under, key=lambda p: (placed[p] - target[p], p)))

    assignments = {
        node: {layers[li]: tuple(sorted(held[p][li])) for li in range(num_layers)}
        for p, node in enumerate(nodes)
    }
    return _make_plan(
        model, host, assignments, _digest(demand, layers, gate, cosel), size, offers, unreplicated
    )


def planned_budget(budget: int) -> int:
    """What a plan counts of an offer: `budget` rounded down to its BUDGET_BITS highest
    significant bits (at most 1/16 less; 0 and small budgets stay as they are).

    Nodes recompute the plan whenever these rounded offers change, so the plan is a function
    of the gossip as it is now: a node that computes it for the first time gets the plan the
    others computed earlier. An offer that moves a little (a node back from a restart with a
    little more or less free memory) usually rounds to the same value, and then nothing moves;
    the rounded offer never exceeds the real one, so every node has room for its part."""
    if type(budget) is not int or budget < 0:
        raise PlanError(f"a budget is a non-negative integer, got {budget!r}")
    budget = min(budget, MAX_BYTES)  # (a peer may gossip any integer: more is no more use)
    drop = max(0, budget.bit_length() - BUDGET_BITS)
    return budget >> drop << drop


def expected_remote_peers(plan: ExpertPlan, demand: ExpertDemand) -> float:
    """Expected number of distinct non-host peers a token contacts per MoE layer (mean over
    the layers). An approximation, good for comparing plans:

    * a token's routing in a layer is modelled as one pair of distinct experts (i, j),
      drawn with probability proportional to `coselection[i][j]`, or to
      `gate_mass[i] * gate_mass[j]` without coselection (independent choices);
    * the router serves an expert from the host when the host holds it, and two remote
      experts from one peer when some peer holds both; so the pair costs 0, 1 or 2 peers.
      Top-k > 2 routing contacts more peers than this; the ordering between plans is
      what counts;
    * with no pair weight at all (one hot expert, or all zero), one expert drawn by gate
      mass (uniformly if all zero).
    """
    layers, gate, cosel = _check_demand(demand)
    nodes = [n for n in sorted(plan.assignments) if n != plan.host]
    totals = []
    for li, layer in enumerate(layers):
        remote_holders = np.zeros((demand.num_experts, len(nodes)), dtype=bool)
        remote = np.zeros(demand.num_experts, dtype=bool)
        for e in range(demand.num_experts):
            holders = plan.holders(layer, e)
            if not holders:
                raise PlanError(f"layer {layer} expert {e} is not in the plan")
            remote[e] = holders[0] != plan.host
            for node in holders:
                if node != plan.host:
                    remote_holders[e, nodes.index(node)] = True
        g = np.array(gate[li])
        weights = cosel[li].copy() if cosel is not None else np.outer(g, g)
        np.fill_diagonal(weights, 0.0)
        if weights.sum() > 0:
            both = remote[:, None] & remote[None, :]
            shared = (remote_holders.astype(int) @ remote_holders.T.astype(int)) > 0
            cost = remote[:, None].astype(float) + remote[None, :] - (both & shared)
            totals.append(float((weights * cost).sum() / weights.sum()))
        else:
            p = g / g.sum() if g.sum() > 0 else np.full(len(g), 1.0 / len(g))
            totals.append(float((p * remote).sum()))
    return sum(totals) / len(totals)


def demand_digest(demand: ExpertDemand) -> str:
    """16 hex chars identifying the demand: layers, sizes, gate mass, coselection and the
    rankings digest (floats by their exact bits)."""
    return _digest(demand, *_check_demand(demand))


# --- internals -----------------------------------------------------------------------------


def _digest(
    demand: ExpertDemand,
    layers: tuple[int, ...],
    gate: list[list[float]],
    cosel: np.ndarray | None,
) -> str:
    h = hashlib.sha256(b"expert-demand/1\0")
    h.update(demand.rankings_digest.encode() + b"\0")
    h.update(struct.pack("<QQQ", len(layers), demand.num_experts, demand.expert_bytes))
    h.update(struct.pack(f"<{len(layers)}Q", *layers))
    h.update(np.array(gate, dtype="<f8").tobytes())
    h.update(b"-" if cosel is None else b"C" + cosel.astype("<f8").tobytes())
    return h.hexdigest()[:16]


def _make_plan(model, host, assignments, digest, expert_bytes, budgets, unreplicated):
    frozen = {
        node: MappingProxyType({layer: tuple(held[layer]) for layer in sorted(held)})
        for node, held in sorted(assignments.items())
    }
    return ExpertPlan(
        model=model,
        host=host,
        assignments=MappingProxyType(frozen),
        demand_digest=digest,
        expert_bytes=expert_bytes,
        budgets=MappingProxyType({n: budgets[n] for n in sorted(budgets)}),
        unreplicated=tuple(sorted(unreplicated)),
    )


def _preference_order(assignments: Mapping[NodeId, object], host: NodeId) -> list[NodeId]:
    return sorted(assignments, key=lambda n: (n != host, n))


def _flat(held: Mapping[int, tuple[int, ...]]) -> list[int]:
    return [e for experts in held.values() for e in experts]


def _first_copy_quotas(
    quota: list[int], host: int, machines: list[str], num_layers: int, num_experts: int
) -> list[list[int]]:
    """Per layer, how many of its experts each node holds as first copies, given each node's
    total (`quota`). Layer by layer, each layer is split among the machines in proportion to
    what their nodes have left to hold: nodes on separate machines compute a token's experts
    at once, each reading its own memory. Within a machine, its part of each layer goes to
    one node where it can (`_layer_quotas`): nodes sharing a machine share its memory
    bandwidth, so splitting a layer among them would only add calls."""
    groups: dict[str, list[int]] = {}
    for p, machine in enumerate(machines):
        groups.setdefault(machine, []).append(p)
    keys = sorted(groups, key=lambda m: (host not in groups[m], groups[m][0]))
    left = [sum(quota[p] for p in groups[m]) for m in keys]
    parts = []  # per layer, per machine
    for _ in range(num_layers):
        share = _apportion(num_experts, left, left)
        left = [a - b for a, b in zip(left, share, strict=True)]
        parts.append(share)
    rows = [[0] * len(quota) for _ in range(num_layers)]
    for m, key in enumerate(keys):
        members = groups[key]
        local = _layer_quotas(
            [quota[p] for p in members],
            members.index(host) if host in members else None,
            [parts[li][m] for li in range(num_layers)],
        )
        for li in range(num_layers):
            for j, p in enumerate(members):
                rows[li][p] = local[li][j]
    return rows


def _layer_quotas(quota: list[int], host: int | None, sizes: list[int]) -> list[list[int]]:
    """The nodes of one machine: per layer, how many of the machine's `sizes[layer]` first
    copies each node holds, given each node's total (`quota`, summing to sum(sizes)). A
    layer part held by one node costs a token at most one call (none on the host); split
    between two nodes other than the host, it can cost two. So each node other than the host
    takes whole layer parts and its remainder in one part it shares with the host, and the
    host the rest, when the host is on this machine and its quota covers those shared parts;
    otherwise every node, the host first, takes a run of layers in turn (a layer part may
    then be split among several nodes)."""
    if host is not None:
        rows = [[0] * len(quota) for _ in sizes]
        layer = 0
        for p in (p for p in range(len(quota)) if p != host):
            left = quota[p]
            while left and layer < len(sizes):
                take = min(left, sizes[layer])
                rows[layer][p] = take
                rows[layer][host] = sizes[layer] - take
                left -= take
                layer += 1
            if left:
                break  # out of layers: the host's quota cannot cover the shared parts
        for rest in range(layer, len(sizes)):
            rows[rest][host] = sizes[rest]
        if sum(row[host] for row in rows) == quota[host]:
            return rows
    rows = []
    left = list(quota)
    fill = [host] if host is not None else []
    order = iter(p for p in [*fill, *(p for p in range(len(quota)) if p != host)] if left[p])
    current = next(order, None)
    for size in sizes:
        counts = [0] * len(quota)
        need = size
        while need and current is not None:
            take = min(need, left[current])
            counts[current] += take
            left[current] -= take
            need -= take
            if not left[current]:
                current = next(order, None)
        rows.append(counts)
    return rows


def _apportion(total: int, weights: Sequence[int], caps: Sequence[int]) -> list[int]:
    """Split `total` proportionally to `weights`, no share above its cap: shares that
    would exceed their cap are fixed at it and the rest re-split; then largest remainder
    (ties: lower index). Exact integer arithmetic. Requires total <= sum of caps where
    weight > 0."""
    alloc = [0] * len(weights)
    active = [i for i, w in enumerate(weights) if w > 0 and caps[i] > 0]
    remaining = total
    while remaining > 0:
        weight = sum(weights[i] for i in active)
        if weight == 0:
            raise AssertionError("apportion: more to place than room")  # callers prevent it
        over = [i for i in active if remaining * weights[i] > caps[i] * weight]
        if over:
            for i in over:
                alloc[i] = caps[i]
                remaining -= caps[i]
            active = [i for i in active if i not in over]
            continue
        for i in active:
            alloc[i] = remaining * weights[i] // weight
        leftover = remaining - sum(alloc[i] for i in active)
        by_remainder = sorted(active, key=lambda i: (-(remaining * weights[i] % weight), i))
        for i in by_remainder[:leftover]:
            alloc[i] += 1
        remaining = 0
    return alloc


def _normalize_peers(peers: Sequence[PeerOffer]) -> dict[NodeId, int]:
    offers: dict[NodeId, int] = {}
    for peer in peers:
        if not isinstance(peer, PeerOffer) or not isinstance(peer.node_id, NodeId):
            raise PlanError("peers are PeerOffer(node_id: NodeId, budget: int)")
        if type(peer.budget) is not int or not 0 <= peer.budget <= MAX_BYTES:
            raise PlanError(f"peer {peer.node_id.short}: budget is a non-negative integer")
        if not isinstance(peer.machine, str) or len(peer.machine) > MAX_MACHINE:
            raise PlanError(
                f"peer {peer.node_id.short}: machine is a string of at most {MAX_MACHINE} "
                "characters"
            )
        if offers.setdefault(peer.node_id, peer.budget) != peer.budget:
            raise PlanError(f"peer {peer.node_id.short} is offered twice with different budgets")
    return {n: offers[n] for n in sorted(offers)}


def _machines(peers: Sequence[PeerOffer]) -> dict[NodeId, str]:
    """Node -> the key of the machine it runs on ("" gives a node a machine of its own).
    Call after `_normalize_peers` has checked the offers."""
    machines: dict[NodeId, str] = {}
    for peer in peers:
        key = "m:" + peer.machine if peer.machine else "n:" + peer.node_id.key.hex()
        if machines.setdefault(peer.node_id, key) != key:
            raise PlanError(f"peer {peer.node_id.short} is offered twice on different machines")
    return machines


def _check_fraction(value: float) -> None:
    if type(value) not in (int, float) or not (0.0 <= value <= 1.0):  # NaN fails too
        raise PlanError("replicate_fraction is a number from 0 to 1")


def _check_demand(
    demand: ExpertDemand,
) -> tuple[tuple[int, ...], list[list[float]], np.ndarray | None]:
    """Validate shapes and values. Return, in ascending layer order (so the order the
    layers are listed in does not matter): the layers, the gate mass as floats and the
    coselection matrices, symmetrized exactly, as one [layers, E, E] array."""
    if not isinstance(demand, ExpertDemand):
        raise PlanError("demand is an ExpertDemand")
    layers, num_experts = demand.layers, demand.num_experts
    if not isinstance(layers, (tuple, list)) or not layers:
        raise PlanError("demand.layers lists at least one MoE layer")
    if any(type(layer) is not int or not 0 <= layer <= MAX_INDEX for layer in layers):
        raise PlanError("demand.layers are integers from 0 to 2**32 - 1")
    if len(set(layers)) != len(layers):
        raise PlanError("demand.layers has a layer twice")
    if type(num_experts) is not int or not 1 <= num_experts <= MAX_INDEX:
        raise PlanError("demand.num_experts is a positive integer")
    if type(demand.expert_bytes) is not int or not 1 <= demand.expert_bytes <= MAX_BYTES:
        raise PlanError("demand.expert_bytes is a positive integer")
    if not isinstance(demand.rankings_digest, str):
        raise PlanError("demand.rankings_digest is a string")
    order = sorted(range(len(layers)), key=layers.__getitem__)
    gate = _table(demand.gate_mass, (len(layers), num_experts), "demand.gate_mass")[order]
    if demand.coselection is None:
        return tuple(sorted(layers)), gate.tolist(), None
    shape = (len(layers), num_experts, num_experts)
    cosel = _table(demand.coselection, shape, "demand.coselection")[order]
    transposed = cosel.transpose(0, 2, 1)
    if not np.all(np.abs(cosel - transposed) <= SYMMETRY_TOLERANCE * np.maximum(1.0, cosel)):
        raise PlanError("demand.coselection matrices are not symmetric")
    return tuple(sorted(layers)), gate.tolist(), (cosel + transposed) / 2


def _table(values: object, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A nested sequence of finite non-negative numbers of exactly `shape`, as float64."""
    wanted = " x ".join(map(str, shape))
    try:
        table = np.array(values)
    except (ValueError, TypeError):  # ragged
        raise PlanError(f"{name} is a {wanted} table of numbers") from None
    if table.shape != shape or table.dtype.kind not in "iuf":
        raise PlanError(f"{name} is a {wanted} table of numbers")
    table = table.astype(np.float64)
    if not np.all(np.isfinite(table)) or np.any(table < 0):
        raise PlanError(f"{name} holds finite non-negative numbers")
    return table


def _wire_field(d: Mapping, key: str, kind: type | tuple[type, ...]):
    if key not in d:
        raise PlanError(f"a wire plan needs {key!r}")
    value = d[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise PlanError(f"a wire plan's {key!r} has the wrong type")
    return value


def _wire_int(value: object, name: str, minimum: int, maximum: int = MAX_INDEX) -> int:
    if type(value) is not int or not minimum <= value <= maximum:
        raise PlanError(f"a wire plan's {name} is an integer from {minimum} to {maximum}")
    return value


def _wire_node(raw: bytes) -> NodeId:
    try:
        return NodeId(bytes(raw))
    except ValueError:
        raise PlanError("a wire plan node id is 32 bytes") from None


def _wire_sorted_ints(values: object, name: str) -> tuple[int, ...]:
    if not isinstance(values, (list, tuple)):
        raise PlanError(f"a wire plan's {name} is a list")
    out = tuple(_wire_int(v, name, 0) for v in values)
    if any(a >= b for a, b in itertools.pairwise(out)):
        raise PlanError(f"a wire plan's {name} are strictly increasing")
    return out
