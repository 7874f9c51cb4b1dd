"""Independent-shard mode (opt-in, for slow links): each shard node runs a MoE model alone with
part of its experts, so no traffic crosses nodes per token.

A node started with `--moe-shards` offers its MoE models as shards (`ModelInfo.shard`). For a
model, the shard nodes are the live non-client nodes offering it so, sorted by node id; node i
of n serves shard i: the trunk, the hot core (hottest quarter of each layer's experts, on every
shard) and its own share of the rest (placement.shards.plan_shards), with the router choosing
among those experts only (`LoadPlan(restrict_router=True)`). Every shard node is a host of the
model; the gateway sends each session to one shard by rendezvous hashing (placement.shards.
shard_for_session), so a conversation stays on its shard while shards come and go.

The rankings come from the first shard node (the "leader"): it picks them (cached, else a full
analysis now) and publishes their digest; the others fetch them from it, waiting as long as
that takes. When the leader leaves, the next shard node leads: it picks the rankings (that
is a reload of its shard). When the shard nodes change, every shard reloads with the new
split.

This is not exact: each shard is a smaller model. What it costs is measured
(placement.shard_quality) and logged as a warning once the user opts in, and shown in the
"shards" section of the status.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from mesh_node.blocking import close_quietly, run_blocking
from mesh_node.engine import Generator
from mesh_node.engine.catalog import ResolvedModel
from mesh_node.engine.checkpoint import Checkpoint
from mesh_node.engine.loading import LoadPlan
from mesh_node.expert_parallel.coordinator import UNIFORM, ExpertParallel
from mesh_node.identity import NodeId
from mesh_node.membership.messages import ModelInfo
from mesh_node.membership.state import probe_hardware
from mesh_node.placement.shard_quality import shard_quality_summary
from mesh_node.placement.shards import ShardPlan, plan_shards

log = logging.getLogger("mesh_node.shards")

LOAD_WAIT = 300.0  # s: how often a shard node waiting for the leader's rankings says so, and
# how long it tries to fetch a published digest before giving up


@dataclasses.dataclass(frozen=True)
class ShardVariant:
    """Which shard this node serves: index of count, with the rankings the split used."""

    index: int
    count: int
    rankings: str


class IndependentShards:
    def __init__(self, experts: ExpertParallel, *, enabled: bool = False):
        self.experts = experts
        self.enabled = enabled
        self.plans: dict[str, tuple[ShardVariant, ShardPlan]] = {}  # what is loaded here
        # model -> (the split measured: its plan's fingerprint, the cost as shown to the user)
        self.quality: dict[str, tuple[str, str]] = {}
        self._measuring: set[tuple[str, str]] = set()

    @property
    def table(self):
        return self.experts.table

    @property
    def node_id(self) -> NodeId:
        return self.experts.node_id

    def describe(self, infos: list[ModelInfo]) -> list[ModelInfo]:
        """Marks this node's MoE models as offered as shards (when enabled)."""
        if not self.enabled:
            return infos
        return [dataclasses.replace(i, shard=True) if i.experts else i for i in infos]

    def is_sharded(self, model: str) -> bool:
        return any(info.shard for _, info in self.experts.offers_of(model))

    def participants(self, model: str) -> list[NodeId]:
        """The shard nodes of `model`, in shard order."""
        return sorted(
            node
            for node, info in self.experts.offers_of(model)
            if info.shard and self.experts.participates(node)
        )

    def wanted(self, model: str) -> ShardVariant | None:
        """The shard this node should serve now (None: it is not a shard node of `model`, or
        the leader has not published the rankings yet)."""
        nodes = self.participants(model)
        if self.node_id not in nodes:
            return None
        leader_info = self._info_of(model, nodes[0])
        if leader_info is None or not leader_info.rankings:
            return None
        return ShardVariant(nodes.index(self.node_id), len(nodes), leader_info.rankings)

    def must_lead(self, model: str) -> bool:
        """This node is the first shard node of `model` and has published no rankings for it:
        it leads now (the leader before it left) and must pick them, or no split is wanted."""
        nodes = self.participants(model)
        if not nodes or nodes[0] != self.node_id:
            return False
        own = self._info_of(model, self.node_id)
        return own is not None and not own.rankings

    def _info_of(self, model: str, node: NodeId) -> ModelInfo | None:
        return next((i for n, i in self.experts.offers_of(model) if n == node), None)

    def loaded(self, model: str) -> ShardVariant | None:
        entry = self.plans.get(model)
        return entry[0] if entry is not None else None

    async def load(self, resolved: ResolvedModel, config: Any) -> Generator:
        """Loads this node's shard of `resolved`. Waits for the leader's rankings however long
        its analysis takes (saying so every LOAD_WAIT seconds; if the leader leaves meanwhile,
        the next one picks them, this node when it is next); once they are published, fetching
        them may take LOAD_WAIT seconds (TimeoutError after: the leader is out of reach)."""
        model = resolved.name
        warn_at = time.monotonic() + LOAD_WAIT
        fetching: tuple[tuple[str, NodeId], float] | None = None  # (digest, from), since
        rankings = None
        while True:
            nodes = self.participants(model)
            if self.node_id not in nodes:
                raise RuntimeError(f"this node is not a shard node of {model}")
            if self.must_lead(model):  # the leader, now or since the one before left
                await self.experts.choose_rankings(model, analysis="full")
            variant = self.wanted(model)
            if variant is None:
                fetching = None  # (a new leader analysing: its digest's fetch starts afresh)
            else:
                if variant.rankings == UNIFORM:
                    break
                rankings = self.experts.rankings_for(model, variant.rankings, nodes[0])
                if rankings is not None:
                    break
                source = (variant.rankings, nodes[0])
                if fetching is None or fetching[0] != source:
                    fetching = (source, time.monotonic())
                elif time.monotonic() - fetching[1] > LOAD_WAIT:  # published, not fetchable
                    why = self.experts.fetch_error(variant.rankings)
                    raise TimeoutError(
                        f"could not fetch the expert rankings {variant.rankings} of {model} "
                        f"from the shards' leader {nodes[0].short} in {LOAD_WAIT:.0f}s"
                        + (f" ({why})" if why else "")
                    )
            if time.monotonic() > warn_at:
                warn_at = time.monotonic() + LOAD_WAIT
                log.warning(
                    "%s: still waiting for the expert rankings of the shards' leader %s",
                    model,
                    nodes[0].short,
                )
            await self.experts.wait_change(1.0)  # the leader publishes, or the fetch completes
        args = Checkpoint.open(resolved.path).args
        assert args.moe is not None
        if rankings is None:
            mass = {layer: [1.0] * args.moe.num_experts for layer in args.sparse_layer_indices}
        else:
            mass = dict(zip(rankings.layers, rankings.gate_mass, strict=True))
        plan = plan_shards(mass, variant.count, top_k=args.moe.top_k)
        experts = plan.experts(variant.index)
        log.info(
            "loading shard %d of %d of %s (%d of %d experts per layer)",
            variant.index + 1,
            variant.count,
            model,
            len(next(iter(experts.values()))),
            args.moe.num_experts,
        )
        generator = await run_blocking(
            lambda: Generator.from_pretrained(
                str(resolved.path),
                plan=LoadPlan(experts=experts, restrict_router=True),
                device=config.device,
                dtype=config.dtype,
                max_seq_len=config.max_seq_len,
                max_batch=config.max_batch,
                max_queue=config.max_queue,
            ),
            "model-load",
            close_quietly,
        )
        self.plans[model] = (variant, plan)
        self._measure(resolved, plan, mass)
        return generator

    def forget(self, model: str) -> None:
        self.plans.pop(model, None)

    def _measure(
        self, resolved: ResolvedModel, plan: ShardPlan, mass: Mapping[int, Sequence[float]]
    ) -> None:
        """Measures (or reads the cached) quality cost of the split `plan`, planned from the
        gate `mass` of the rankings in use, then shows it (the figure of a split no longer
        loaded is never shown for the one that replaced it)."""
        model, count = resolved.name, plan.num_shards
        key = (model, plan.fingerprint)
        if count < 2:
            self.quality[model] = (plan.fingerprint, "one shard: the whole model, no loss")
            return
        if key in self._measuring:
            return
        self._measuring.add(key)

        def current() -> bool:  # still this split (not split again while measuring)
            entry = self.plans.get(model)
            return entry is not None and entry[1].fingerprint == plan.fingerprint

        async def measure() -> None:
            try:
                quality = await run_blocking(
                    lambda: shard_quality_summary(
                        str(resolved.path),
                        count,
                        memory=probe_hardware(with_gpus=False).ram_free or None,
                        gate_mass=mass,
                    ),
                    "shard-quality",
                )
                if current():
                    self.quality[model] = (plan.fingerprint, quality.describe())
                    log.warning("%s: %s", model, quality.describe())
            except Exception as exc:  # the mode works without the figure; say why it is missing
                if current():
                    self.quality[model] = (plan.fingerprint, f"quality not measured: {exc}")
                log.warning("%s: could not measure the shard mode's quality: %s", model, exc)
            finally:
                self._measuring.discard(key)
                self.experts.kick()

        self.experts.spawn(measure())

    def quality_of(self, model: str) -> str:
        """The quality line of the split loaded now ("measuring" until it is known)."""
        entry, measured = self.plans.get(model), self.quality.get(model)
        if entry is None or measured is None or measured[0] != entry[1].fingerprint:
            return "measuring"
        return measured[1]

    def status(self) -> list[dict[str, Any]]:
        """The "shards" section of the status document."""
        sections = []
        for model, (variant, plan) in sorted(self.plans.items()):
            sections.append(
                {
                    "model": model,
                    "shard": variant.index,
                    "shards": variant.count,
                    "nodes": [str(n) for n in self.participants(model)],
                    "rankings": variant.rankings,
                    "plan": plan.fingerprint,
                    "experts": {
                        str(layer): list(ids) for layer, ids in plan.experts(variant.index).items()
                    },
                    "num_experts": plan.num_experts,
                    "core": {str(layer): list(plan.core_experts(layer)) for layer in plan.layers},
                    "experts_per_shard": [
                        min(map(len, plan.experts(i).values())) for i in range(plan.num_shards)
                    ],
                    "quality": self.quality_of(model),
                }
            )
        return sections
