"""Expert parallelism for a node: plans, this node's share of the experts, and the routes.

A node started with expert parallelism on offers each MoE model it has on disk "split": its
gossiped `ModelInfo` carries `expert_budget` (bytes it will hold of that model's routed
experts) and `trunk_bytes`. A model is split when any live node offers it so. Then:

* the election (placement.election) picks one host, by the trunk's size, not the model's;
* the host picks the rankings (full before micro: ones fetched from an earlier host, else
  cached here; else a micro run now, one layer in memory at a time when the whole model fits
  here, else uniform) and publishes their digest; peers fetch the rankings from it
  (`RankingsRequest`) when they do not have them;
* every node computes the plan (placement.expert_plan) from the same gossiped inputs: the
  host, the live participants and their budgets (the host's minus the trunk), the rankings.
  Budgets count rounded (`planned_budget`), and the plan is recomputed whenever these
  inputs change: a budget that moves a little usually moves nothing, and a node computing
  the plan for the first time gets the plan the others computed before;
* each participant loads its experts (only their bytes are read), keeps the ones it is
  giving up until their new holders have them, and publishes what it holds
  (`expert_shards`); hosts route by what is published, so a plan change never sends a call
  to a node that has not loaded the expert yet;
* the host's engine runs every MoE layer through `RemoteExperts` (dispatch.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mesh_node.blocking import run_blocking
from mesh_node.cancellation import cancel_and_wait
from mesh_node.engine.catalog import ResolvedModel
from mesh_node.engine.checkpoint import Checkpoint
from mesh_node.engine.host_memory import release_free_memory
from mesh_node.engine.loading import (
    LoadPlan,
    expert_nbytes,
    load_expert_banks,
    load_model,
    resolve_device,
    resolve_dtype,
)
from mesh_node.english import counted
from mesh_node.expert_parallel.core_share import decode_threads, on_this_machine
from mesh_node.expert_parallel.dispatch import (
    DispatchConfig,
    DispatchStats,
    ExpertRoutes,
    PeerGone,
    RemoteExperts,
    partial_sums,
    rows_per_call,
    weighted_call,
)
from mesh_node.expert_parallel.lanes import ExpertLanes
from mesh_node.expert_parallel.messages import RankingsData, RankingsRequest
from mesh_node.expert_parallel.service import ExpertService
from mesh_node.identity import NodeId
from mesh_node.membership.claims import ALIVE, STATUS_PHRASES
from mesh_node.membership.dialing import connect_member
from mesh_node.membership.messages import ExpertShard, ModelInfo
from mesh_node.membership.swim import Membership
from mesh_node.membership.table import CONTACT, REMOVED
from mesh_node.placement import rankings as rankings_mod
from mesh_node.placement.expert_plan import (
    ExpertDemand,
    ExpertPlan,
    PeerOffer,
    PlanError,
    plan_experts,
    planned_budget,
)
from mesh_node.transport.connection import Handlers, RequestContext
from mesh_node.transport.endpoint import Endpoint
from mesh_node.transport.errors import ErrorCode, RemoteError, RequestFailed, TransportError
from mesh_node.transport.express import SECRET_SIZE, ExpressClient, probe_lane
from mesh_node.transport.messages import ExpressLane, ExpressOpen

log = logging.getLogger("mesh_node.experts")

UNIFORM = "uniform"  # the rankings digest meaning "no rankings: every expert alike"
FETCH_RETRY = 1.0  # seconds before a failed rankings fetch is tried again, doubling each time
FETCH_RETRY_MAX = 60.0  # ... up to this
MAX_FETCH_FAILURES = 256  # digests whose fetch failed, remembered (oldest forgotten first)
MAX_RANKINGS = 8  # rankings documents kept (least recently used forgotten first; never the
# ones a current plan or this node's own ModelInfo uses): a host may publish a new digest often


def _layers_text(layers) -> str:
    layers = list(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    shown = ", ".join(str(layer) for layer in layers[:8])
    return f"[{shown}{', ...' if len(layers) > 8 else ''}]"


def split_call(
    experts: list[int], counts: list[int], max_rows: int
) -> list[tuple[list[int], list[int]]]:
    """(experts, counts) cut into pieces of at most `max_rows` rows, in order (an expert's
    rows may be split between two pieces: each row is computed on its own)."""
    pieces: list[tuple[list[int], list[int]]] = [([], [])]
    room = max_rows
    for expert, count in zip(experts, counts, strict=True):
        while count:
            if not room:
                pieces.append(([], []))
                room = max_rows
            take = min(count, room)
            pieces[-1][0].append(expert)
            pieces[-1][1].append(take)
            count -= take
            room -= take
    return pieces


@dataclass(frozen=True)
class ExpertParallelConfig:
    enabled: bool = False  # offer this node's MoE models in expert-parallel mode
    shards: bool = False  # offer them in independent-shard mode instead
    memory: int | None = None  # bytes offered per split model (None: 80% of free RAM, shared)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    lanes: bool = True  # decode-sized calls on express lanes where peers grant them (lanes.py)
    connect_timeout: float = 5.0
    release_wait: float = 30.0  # keep given-up experts until their new holders have them
    reoffer_after: float = 60.0  # a stuck expert service's offers back after it answers again


@dataclass
class _ModelPlan:
    inputs: tuple[NodeId, tuple[PeerOffer, ...], str]  # host, offers, rankings digest
    plan: ExpertPlan


class ExpertParallel:
    def __init__(
        self,
        endpoint: Endpoint,
        membership: Membership,
        service: ExpertService,
        handlers: Handlers,
        *,
        config: ExpertParallelConfig | None = None,
        device: str = "auto",
        dtype: str | None = None,
        elected_host: Callable[[str], NodeId | None] = lambda model: None,
    ):
        self.endpoint = endpoint
        self.membership = membership
        self.service = service
        self.config = config or ExpertParallelConfig()
        self.device = device
        self.dtype = dtype
        self.elected_host = elected_host
        self.offered: dict[str, ResolvedModel] = {}
        self.rankings: dict[str, Any] = {}  # digest -> ExpertRankings
        self.plans: dict[str, _ModelPlan] = {}
        self._plan_errors: dict[str, str] = {}  # model -> why no plan fits its inputs
        self._load_errors: dict[str, str] = {}  # model -> why its experts did not load here
        self.routes: dict[str, ExpertRoutes] = {}
        self.stats: dict[str, DispatchStats] = {}
        self._shapes: dict[str, tuple[tuple[int, ...], int, int]] = {}  # layers, E, expert bytes
        self._reconciling: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, int] = {}  # model -> failed loads in a row
        self._retry_at: dict[str, float] = {}  # model -> monotonic time of the next try
        self._fetching: set[str] = set()
        # digest -> (failed fetches in a row, monotonic time of the next try, why)
        self._fetch_failures: dict[str, tuple[int, float, str]] = {}
        # digest -> encoded rankings, as served (encoding once however many ask at once)
        self._documents: dict[str, asyncio.Future[bytes]] = {}
        self._kick = asyncio.Event()
        self._table_changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed: list[Callable[[], None]] = []
        self._calls: dict[NodeId, set[asyncio.Task[Any]]] = {}  # expert calls in flight, by peer
        self._dropped: set[asyncio.Task[Any]] = set()  # calls cancelled: their peer is gone
        self.lanes: dict[str, ExpertLanes] = {}  # hosted model -> its express lanes
        self._other_checkpoints: set[tuple[str, NodeId, str, str]] = set()  # (said once each)
        self._sharded_said: set[str] = set()  # models offered split here but served as shards
        handlers.on_request(RankingsRequest, self._serve_rankings)
        endpoint.on_disconnected.append(self._connection_closed)

    @property
    def node_id(self) -> NodeId:
        return self.membership.node_id

    @property
    def errors(self) -> dict[str, str]:
        """model -> what is wrong with its experts here: no plan fits, else a failed load."""
        return {**self._load_errors, **self._plan_errors}

    @property
    def table(self):
        return self.membership.table

    def on_change(self, callback: Callable[[], None]) -> None:
        self._changed.append(callback)

    # ---- what this node offers
    def describe(self, offered: Sequence[ResolvedModel], infos: list[ModelInfo]) -> list[ModelInfo]:
        """This node's ModelInfos with the expert-parallel fields filled in (blocking: reads
        checkpoint headers). MoE models get their trunk size (this node may host them split
        even when it holds no experts); with expert parallelism enabled, a budget too."""
        by_name = {m.name: m for m in offered}
        split = []
        for info in infos:
            resolved = by_name.get(info.name)
            if resolved is None or not info.experts:
                split.append(info)
                continue
            args = Checkpoint.open(resolved.path).args
            counts = args.parameter_count()
            trunk = info.bytes * counts["trunk"] // max(counts["total"], 1)
            self.offered[info.name] = resolved
            self._shapes[info.name] = self._shape_of(args)
            # expert_budget is filled below, shared between the split models (the checkpoint
            # is hosting's: Hosting.start)
            split.append(_with(info, trunk_bytes=trunk, expert_budget=0))
        models = [i for i in split if i.name in self.offered]
        if models and self.config.enabled:
            budget = self.config.memory
            if budget is None:
                budget = int(0.8 * self._free_for_experts()) // len(models)
            split = [
                _with(i, expert_budget=max(1, budget)) if i.name in self.offered else i
                for i in split
            ]
        return split

    def _free_for_experts(self) -> int:
        """Free memory where this node's experts load: the GPU's when they load on one (a node
        with more RAM than GPU memory would otherwise be planned more experts than its GPU
        holds, and fail to load them for ever), else the RAM's. Blocking (a CUDA query)."""
        device = resolve_device(self.device)
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return free
        hardware = self.membership.self_state.current.hardware
        return hardware.ram_free if hardware is not None else 0

    def _shape_of(self, args) -> tuple[tuple[int, ...], int, int]:
        dtype = resolve_dtype(self.dtype, args, resolve_device(self.device))
        return args.sparse_layer_indices, args.moe.num_experts, expert_nbytes(args, dtype)

    def is_split(self, model: str) -> bool:
        """Some live node offers `model` in expert-parallel mode, and none as an independent
        shard (that mode wins when both are offered: the shard nodes host it, see
        Hosting.evaluate, and a split's plan would only hold experts no host calls)."""
        offers = self.offers_of(model)
        return any(i.expert_budget > 0 for _, i in offers) and not any(i.shard for _, i in offers)

    def _machine_of(self, node: NodeId) -> str:
        """The machine label a node gossips ("" when unknown)."""
        member = self.table.get(node)
        return member.state.machine if member is not None and member.state is not None else ""

    def offers_of(self, model: str) -> list[tuple[NodeId, ModelInfo]]:
        found = []
        for member in self.table:
            if member.live and member.state is not None:
                # (the first entry only: a node that lists a model twice must not make the
                # mesh's plan fail with "offered twice")
                info = next((i for i in member.state.models_on_disk if i.name == model), None)
                if info is not None:
                    found.append((member.node_id, info))
        return found

    # ---- lifecycle
    async def start(self) -> None:
        self.table.subscribe(self._on_table_change)
        self.spawn(self._loop())
        self.spawn(self._watch_service())
        self._kick.set()

    def _on_table_change(self, member, what) -> None:
        if what == CONTACT:  # heard from a peer: nothing a plan or a route depends on
            return
        self._kick.set()
        self._table_changed.set()
        calls = self._calls.get(member.node_id)
        if calls and (what == REMOVED or member.status != ALIVE):
            # suspected, dead or gone: its calls fail over now, not at their timeout
            for task in calls:
                self._dropped.add(task)
                task.cancel()

    def close_routes(self, reason: str) -> None:
        """A step of a split model under way here makes no more expert calls: it fails with
        `reason` (the node is stopping: peers are replanning without it, and its steps would
        otherwise retry their refusals until holder_wait, holding up the stop)."""
        for routes in self.routes.values():
            routes.close(reason)

    async def stop(self) -> None:
        await cancel_and_wait(list(self._tasks) + list(self._reconciling.values()))
        for lanes in self.lanes.values():
            lanes.close()
        self.lanes.clear()
        self.service.close()

    def _connection_closed(self, conn) -> None:
        for lanes in self.lanes.values():
            lanes.connection_closed(conn)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _loop(self) -> None:
        while True:
            await self._kick.wait()
            await asyncio.sleep(0.05)
            self._kick.clear()
            try:
                self.evaluate()
            except Exception:  # a bug must not stop planning for good: say it, go on
                log.exception("expert planning failed")

    def kick(self) -> None:
        self._kick.set()

    async def _watch_service(self) -> None:
        """A computation of the expert service that runs longer than any host waits for one
        (`call_timeout`) is stuck: a hung GPU, a deadlock, swapping. The node still answers
        probes, so the mesh keeps it in the plan, and every step that needs its experts
        would wait for them, then fail. So while it is stuck the node withdraws its offers
        (budget 0: the mesh plans without it, and its experts move to others, as when a node
        leaves), and offers them again `reoffer_after` seconds after it answers again."""
        limit = self.config.dispatch.call_timeout
        loop = asyncio.get_running_loop()
        withdrawn: dict[str, int] = {}  # model -> the budget it offered
        answering_since: float | None = None
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            if self.service.busy_for() > limit:
                answering_since = None
                if withdrawn:
                    continue
                withdrawn = {
                    i.name: i.expert_budget
                    for i in self.membership.self_state.current.models_on_disk
                    if i.expert_budget > 0 and self.elected_host(i.name) != self.node_id
                }
                if withdrawn:
                    log.warning(
                        "an expert computation has run for over %gs: withdrawing this node's "
                        "expert offers (%s) until it answers again",
                        limit,
                        ", ".join(sorted(withdrawn)),
                    )
                for model in withdrawn:
                    self._publish_model(model, expert_budget=0)
            elif withdrawn:
                answering_since = answering_since or loop.time()
                if loop.time() - answering_since >= self.config.reoffer_after:
                    log.info("the expert service answers again: offering experts again")
                    for model, budget in withdrawn.items():
                        self._publish_model(model, expert_budget=budget)
                    withdrawn = {}

    async def wait_change(self, timeout: float) -> None:
        """Until the peer table changes or fetched rankings arrive (at most `timeout` s)."""
        self._table_changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # not wait_for: see wait_covered
                await self._table_changed.wait()

    # ---- plans
    def evaluate(self) -> None:
        changed = False
        models = {i.name for m in self.table if m.live and m.state for i in m.state.models_on_disk}
        # only models on disk here: this node neither holds nor hosts others (and a peer may
        # gossip any number of names)
        models &= set(self._shapes)
        for model in sorted(models):
            if not self.is_split(model):
                changed |= self._unsplit(model)
                continue
            self._sharded_said.discard(model)
            changed |= self._plan(model)
            self._update_routes(model)
            self._share_cores(model)
            if model in self.offered:
                self._reconcile(model)
        if changed:
            for callback in self._changed:
                callback()

    def _unsplit(self, model: str) -> bool:
        """`model` is not split: when a node offering it as an independent shard made it so,
        this node forgets the split's plan and gives up the experts it held for it, once the
        split's host no longer serves it (its answers under way finish with them) and a load
        under way here has ended (it looks again then). Whether anything changed."""
        if not any(i.shard for _, i in self.offers_of(model)):
            return False  # (no split offered any more: nothing planned, as before)
        if model in self.offered and model not in self._sharded_said:
            mine = next((i for n, i in self.offers_of(model) if n == self.node_id), None)
            if mine is not None and mine.expert_budget > 0:
                self._sharded_said.add(model)
                log.warning(
                    "%s is served in independent-shard mode (a node offers it with "
                    "--moe-shards, which wins over --moe-split): this node holds none of its "
                    "experts and hosts no shard of it",
                    model,
                )
        entry = self.plans.get(model)
        if entry is not None and self._serves(entry.plan.host, model):
            return False  # (the host is draining: it unloads, then this node looks again)
        changed = self.plans.pop(model, None) is not None
        self._plan_errors.pop(model, None)
        running = self._reconciling.get(model)
        if self.service.held(model) and (running is None or running.done()):
            self.service.replace(model, {})
            self._publish_shards()
            log.info("gave up the experts of %s: it is served in independent-shard mode", model)
            changed = True
        if changed:
            self._publish_model(model, expert_plan="")
        return changed

    def _serves(self, node: NodeId, model: str) -> bool:
        member = self.table.get(node)
        return (
            member is not None
            and member.live
            and member.state is not None
            and model in member.state.models_served
        )

    def _plan(self, model: str) -> bool:
        host = self.elected_host(model)
        infos = self.offers_of(model)
        host_info = next((i for n, i in infos if n == host), None)
        if host is None or host_info is None or not host_info.rankings:
            return False  # no host yet, or it has not chosen rankings
        digest = host_info.rankings
        demand = self._demand(model, digest, host)
        if demand is None:  # fetching the rankings
            why = self.fetch_error(digest)
            if why is not None:  # (shown in the status; cleared once a plan is made)
                self._plan_errors[model] = f"cannot get the host's expert rankings: {why}"
            return False
        others = {n for n, i in infos if i.checkpoint != host_info.checkpoint}
        self._say_other_checkpoints(model, host_info.checkpoint, others, dict(infos))
        offers = self._offers(host, host_info, infos)
        current = self.plans.get(model)
        if current is not None and current.inputs == (host, offers, digest):
            # (the offers are rounded: a budget that moved a little moves nothing; inputs that
            # came back to this plan's after ones that admitted none: that error is gone)
            self._plan_errors.pop(model, None)
            return False
        try:
            plan = plan_experts(model, host, offers, demand)
        except PlanError as exc:
            if self._plan_errors.get(model) != str(exc):
                log.error("cannot place the experts of %s: %s", model, exc)
            self._plan_errors[model] = str(exc)
            return True
        self._plan_errors.pop(model, None)
        for failed in (self._load_errors, self._failures, self._retry_at):
            failed.pop(model, None)  # a new plan: a new load, at once (its own backoff)
        self.plans[model] = _ModelPlan((host, offers, digest), plan)
        self._publish_model(model, expert_plan=plan.fingerprint)
        mine = plan.experts_of(self.node_id)
        log.info(
            "expert plan %s for %s: %s, this node holds %s (%d bytes)",
            plan.fingerprint,
            model,
            counted(len(offers), "peer"),
            counted(sum(len(v) for v in mine.values()), "expert"),
            plan.bytes_of(self.node_id),
        )
        return True

    def _offers(
        self, host: NodeId, host_info: ModelInfo, infos: list[tuple[NodeId, ModelInfo]]
    ) -> tuple[PeerOffer, ...]:
        """The plan's offers (PROTOCOL.md): the participating nodes offering a budget for the
        host's checkpoint, the host's less its trunk, and the host itself (budget 0 if none)."""
        trunk = host_info.trunk_bytes
        offers = [
            PeerOffer(
                node,
                planned_budget(max(0, i.expert_budget - (trunk if node == host else 0))),
                self._machine_of(node),
            )
            for node, i in infos
            if i.expert_budget > 0
            and self.participates(node)
            and i.checkpoint == host_info.checkpoint
        ]
        if host not in {o.node_id for o in offers}:
            offers.append(PeerOffer(host, 0, self._machine_of(host)))
        return tuple(sorted(offers, key=lambda o: o.node_id))

    def lacking_room(self, model: str) -> str | None:
        """Why no plan can place the experts of `model` with this node as its host (the
        offers together cannot hold each of them once, as step 1 of plan_experts finds;
        no rankings needed); None when they can, or when this node does not offer `model`."""
        infos = self.offers_of(model)
        mine = next((i for n, i in infos if n == self.node_id), None)
        shape = self._shapes.get(model)
        if mine is None or shape is None:
            return None
        layers, num_experts, expert_bytes = shape
        offers = self._offers(self.node_id, mine, infos)
        held = sum(o.budget // expert_bytes for o in offers)
        needed = len(layers) * num_experts
        if held >= needed:
            return None
        return (
            f"the nodes offering memory for its experts (--moe-split) have room for "
            f"{held} of its {needed} experts"
        )

    def _say_other_checkpoints(self, model, host_copy: str, others: set[NodeId], infos) -> None:
        """Log, once per node and copy, a node whose copy of `model` is another checkpoint than
        the host's (another revision or fine-tune under the same name): its experts would mix
        another model's numbers into every answer, so the plan leaves it out."""
        for node in sorted(others):
            key = (model, node, infos[node].checkpoint, host_copy)
            if key not in self._other_checkpoints:
                if len(self._other_checkpoints) >= 1024:  # (bounded: a peer may gossip anything)
                    self._other_checkpoints.clear()
                self._other_checkpoints.add(key)
                log.warning(
                    "node %s has another checkpoint of %s than its host (%s, the host's %s): "
                    "it holds none of its experts",
                    node.short,
                    model,
                    infos[node].checkpoint or "unknown",
                    host_copy or "unknown",
                )

    def colocated_peers(self, model: str) -> int:
        """Live nodes of the model's expert plan, other than this one, that run on this
        machine (they share its cores; see core_share)."""
        entry = self.plans.get(model)
        if entry is None:
            return 0
        count = 0
        for offer in entry.inputs[1]:
            member = self.table.get(offer.node_id)
            if offer.node_id == self.node_id or member is None or not member.live:
                continue
            if any(on_this_machine(address.host) for address in member.addresses):
                count += 1
        return count

    def _share_cores(self, model: str) -> None:
        """Threads for the decode-sized expert calls this node serves: fewer when other
        nodes of the model's plan share this machine (see core_share)."""
        entry = self.plans.get(model)
        if entry is None or all(offer.node_id != self.node_id for offer in entry.inputs[1]):
            return  # not a node of this plan (a client, say): it computes none of its calls
        nodes = self.colocated_peers(model)
        threads = decode_threads(nodes, self.service.all_threads) or self.service.all_threads
        if threads != self.service.call_threads(model):
            log.info(
                "%s: %d other node(s) of its expert plan on this machine: "
                "decode-sized expert calls on %d intra-op thread(s)",
                model,
                nodes,
                threads,
            )
            self.service.set_call_threads(model, threads)

    def participates(self, node: NodeId) -> bool:
        member = self.table.get(node)
        return (
            member is not None
            and member.live
            and member.state is not None
            and (member.state.role != "client")
        )

    def _demand(self, model: str, digest: str, host: NodeId) -> ExpertDemand | None:
        shape = self._shapes.get(model)
        if shape is None:
            return None  # not on disk here: this node neither holds nor hosts it
        layers, num_experts, expert_bytes = shape
        if digest == UNIFORM:
            mass = tuple(tuple(1.0 for _ in range(num_experts)) for _ in layers)
            return ExpertDemand(layers, num_experts, expert_bytes, mass, None, UNIFORM)
        rankings = self.rankings_for(model, digest, host)
        if rankings is None:
            return None
        return ExpertDemand(
            tuple(rankings.layers),
            rankings.num_experts,
            expert_bytes,
            tuple(tuple(r) for r in rankings.gate_mass),
            tuple(tuple(tuple(c) for c in layer) for layer in rankings.coselection),
            digest,
        )

    def rankings_for(self, model: str, digest: str, source: NodeId):
        """The rankings with this digest if this node has them; else None, and they are being
        fetched from `source` (a change is signalled when they arrive, or when a failed fetch
        may be tried again: after FETCH_RETRY seconds, doubling up to FETCH_RETRY_MAX)."""
        rankings = self.rankings.get(digest)
        if rankings is not None:
            self.rankings[digest] = self.rankings.pop(digest)  # recently used
        elif digest not in self._fetching:
            failed = self._fetch_failures.get(digest)
            if failed is None or time.monotonic() >= failed[1]:
                self._fetching.add(digest)
                self.spawn(self._fetch_rankings(model, digest, source))
        return rankings

    def _keep_rankings(self, digest: str, rankings: Any) -> None:
        self.rankings.pop(digest, None)
        self.rankings[digest] = rankings  # (the most recently used last)
        in_use = {entry.inputs[2] for entry in self.plans.values()} | {digest}
        in_use |= {i.rankings for i in self.membership.self_state.current.models_on_disk}
        for old in [d for d in self.rankings if d not in in_use]:
            if len(self.rankings) <= MAX_RANKINGS:
                break
            del self.rankings[old]
            self._documents.pop(old, None)

    def fetch_error(self, digest: str) -> str | None:
        """Why the last fetch of these rankings failed (None: it did not, or none was made)."""
        failed = self._fetch_failures.get(digest)
        return failed[2] if failed is not None else None

    async def _fetch_rankings(self, model: str, digest: str, host: NodeId) -> None:
        try:
            conn = await connect_member(
                self.endpoint, self.table, host, timeout=self.config.connect_timeout
            )
            if conn is None:
                raise PeerGone(f"host {host.short} unreachable")
            reply = await conn.request(RankingsRequest(model, digest), timeout=30.0)
            if not isinstance(reply, RankingsData):
                raise PeerGone(f"host answered {type(reply).__name__}")
            data = reply.data()
            # the document travels in its canonical encoding, whose digest was published: any
            # other bytes are refused before decoding them costs anything
            if rankings_mod.document_digest(data) != digest:
                raise PeerGone("the rankings received do not match their digest")
            rankings = await run_blocking(  # a large model's: a second or more to decode
                lambda: rankings_mod.ExpertRankings.from_bytes(data), "rankings"
            )
            problem = self._shape_problem(model, rankings)
            if problem is not None:
                raise PeerGone(problem)
            self._keep_rankings(digest, rankings)
            self._fetch_failures.pop(digest, None)
            log.info("fetched expert rankings %s of %s from %s", digest, model, host.short)
        except Exception as exc:  # tried again after a back-off
            failures = self._fetch_failures.pop(digest, (0, 0.0, ""))[0] + 1
            delay = min(FETCH_RETRY * 2 ** min(failures - 1, 16), FETCH_RETRY_MAX)
            self._fetch_failures[digest] = (failures, time.monotonic() + delay, str(exc))
            while len(self._fetch_failures) > MAX_FETCH_FAILURES:
                del self._fetch_failures[next(iter(self._fetch_failures))]
            log.warning(
                "could not fetch rankings %s of %s from %s: %s (trying again in %.0f s)",
                digest,
                model,
                host.short,
                exc,
                delay,
            )
            asyncio.get_running_loop().call_later(delay, self._wake)
        finally:
            self._fetching.discard(digest)
            self._wake()

    def _wake(self) -> None:
        self._kick.set()
        self._table_changed.set()

    def _shape_problem(self, model: str, rankings: Any) -> str | None:
        """Why these rankings cannot be planned with for this node's copy of `model` (another
        checkpoint: other MoE layers or expert count); None when they can."""
        shape = self._shapes.get(model)
        if shape is None:
            return None
        layers, num_experts, _ = shape
        if tuple(rankings.layers) == tuple(layers) and rankings.num_experts == num_experts:
            return None
        return (
            f"the rankings are of a checkpoint with {rankings.num_experts} experts in MoE layers "
            f"{_layers_text(rankings.layers)}; this node's {model} has {num_experts} experts in "
            f"MoE layers {_layers_text(layers)}: not the same model"
        )

    async def _serve_rankings(self, ctx: RequestContext, request: RankingsRequest) -> RankingsData:
        rankings = self.rankings.get(request.digest)
        if rankings is None:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"no rankings {request.digest} here")
        encoding = self._documents.get(request.digest)
        if encoding is None:  # encoded once, off the loop (a large model's take a while)
            encoding = asyncio.ensure_future(run_blocking(rankings.to_bytes, "rankings"))
            self._documents[request.digest] = encoding
            encoding.add_done_callback(lambda done, digest=request.digest: self._encoded(digest))
        document = await asyncio.shield(encoding)
        return RankingsData.of(document)

    def _encoded(self, digest: str) -> None:
        encoding = self._documents.get(digest)
        if encoding is None or not encoding.done():
            return
        if digest not in self.rankings or encoding.cancelled() or encoding.exception():
            del self._documents[digest]  # (forgotten meanwhile, or failed: not kept)

    async def choose_rankings(self, model: str, analysis: str = "micro") -> str:
        """On the host: the rankings the mesh will plan with (see module doc); publishes the
        digest in this node's ModelInfo and returns it. `analysis`: the kind of run to make
        when none is cached."""
        resolved = self.offered[model]
        known = list(self.rankings.values())  # (read here, on the loop, not in the worker)
        rankings = await run_blocking(
            lambda: self._find_rankings(resolved, analysis, known), "rankings"
        )
        digest = UNIFORM
        if rankings is not None:
            digest = rankings.digest()
            self._keep_rankings(digest, rankings)
        self._publish_model(model, rankings=digest)
        log.info("expert rankings for %s: %s", model, digest)
        self._kick.set()
        return digest

    def stop_hosting(self, model: str) -> None:
        """This node no longer hosts `model`: it stops publishing the rankings it chose."""
        self._publish_model(model, rankings="")
        lanes = self.lanes.pop(model, None)
        if lanes is not None:
            lanes.close()

    def _find_rankings(self, resolved: ResolvedModel, analysis: str, known: list[Any]):
        """Rankings of this checkpoint: full before micro, each the ones the mesh shared with
        this node (`known`: fetched from a host or leader that has left since) before the
        cache here; else an analysis now (None when it fails)."""
        fingerprint = rankings_mod.checkpoint_fingerprint(resolved.path)
        shared = [r for r in known if r.fingerprint == fingerprint]
        for kind in ("full", "micro"):
            cached = next((r for r in shared if r.kind == kind), None)
            cached = cached or rankings_mod.load_cached(fingerprint, kind)
            if cached is not None:
                return cached
        # one layer in memory at a time: a host need not have room for the whole model
        try:
            rankings = rankings_mod.analyze(
                resolved.path, kind=analysis, device="cpu", by_layer=True
            )
        except Exception as exc:  # planning goes on without rankings; say why
            log.warning(
                "could not rank the experts of %s (%s): every expert alike", resolved.name, exc
            )
            return None
        finally:
            release_free_memory()
        rankings_mod.save_or_warn(rankings)
        return rankings

    # ---- routes
    def _update_routes(self, model: str) -> None:
        """Who this node's engine may call for each expert of `model`: the live nodes that
        publish holding it, planned holders first, and only nodes whose copy of `model` is
        this node's checkpoint (a node of another copy may still hold experts of a plan made
        for a host of its own copy: its numbers would be another model's)."""
        routes = self.routes.setdefault(model, ExpertRoutes())
        entry = self.plans.get(model)
        mine = _checkpoint_of(self.membership.self_state.current.models_on_disk, model)
        holders: dict[tuple[int, int], list[tuple[tuple[int, int, bytes], NodeId]]] = {}
        for member in self.table:
            if member.node_id == self.node_id or not member.live or member.state is None:
                continue
            if _checkpoint_of(member.state.models_on_disk, model) != mine:
                continue
            for shard in member.state.expert_shards:
                if shard.model != model:
                    continue
                for expert in shard.experts:
                    planned = entry is not None and member.node_id in entry.plan.holders(
                        shard.layer, expert
                    )
                    rank = (
                        0 if member.status == ALIVE else 1,
                        0 if planned else 1,
                        member.node_id.key,
                    )
                    holders.setdefault((shard.layer, expert), []).append((rank, member.node_id))
        routes.update({key: tuple(n for _, n in sorted(found)) for key, found in holders.items()})

    def coverage(self, model: str) -> list[tuple[int, int]]:
        """(layer, expert) that neither this node nor any live peer holds."""
        shape = self._shapes.get(model)
        if shape is None:
            return []
        layers, num_experts, _ = shape
        routes = self.routes.get(model) or ExpertRoutes()
        held = self.service.held(model)
        return [
            (layer, e)
            for layer in layers
            for e in range(num_experts)
            if e not in held.get(layer, ()) and not routes.holders(layer, e)
        ]

    # ---- this node's share
    def _reconcile(self, model: str) -> None:
        running = self._reconciling.get(model)
        if running is not None and not running.done():
            return  # it looks again when done
        entry = self.plans.get(model)
        if entry is None:
            return
        want = {layer: e for layer, e in entry.plan.experts_of(self.node_id).items() if e}
        if want == self.service.held(model):
            return
        retry_at = self._retry_at.get(model, 0.0)
        if time.monotonic() < retry_at:
            return  # a failed load is retried after a backoff (a kick is scheduled)
        self._reconciling[model] = self.spawn(self._apply(model, entry.plan, want))

    async def _apply(self, model: str, plan: ExpertPlan, want: dict[int, tuple[int, ...]]):
        """Load what the plan adds, layer by layer (only the new experts' bytes are read; one
        layer's copy at a time), publish; then give up what it moved elsewhere once a live node
        the plan gives it to publishes holding it."""
        path = self.offered[model].path
        try:
            for layer, ids in sorted(want.items()):
                old = self.service.bank(model, layer)
                new = sorted(set(ids) - set(old.expert_ids if old is not None else ()))
                if not new:
                    continue
                fresh = await run_blocking(
                    lambda layer=layer, new=new: load_expert_banks(
                        path, {layer: new}, dtype=self.dtype, device=self.device
                    )[layer],
                    "expert-load",
                )
                merged = (
                    fresh
                    if old is None
                    else await run_blocking(
                        lambda old=old, fresh=fresh: old.merged(fresh), "expert-merge"
                    )
                )
                self.service.replace_layer(model, layer, merged)
            self._publish_shards()
            if self.service.held(model) != want:
                deadline = time.monotonic() + self.config.release_wait
                while not self._realized(model, plan) and not self._superseded(model, plan):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._table_changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):  # not wait_for: see wait_covered
                            await self._table_changed.wait()
                # drop only experts that a node the plan gives them to holds already: never
                # leave one uncovered (another old holder may be dropping it right now); and
                # nothing when a newer plan came meanwhile (the next reconcile follows that one)
                covered = plan.covered(self.node_id, self._published(model))
                for layer, ids in sorted(self.service.held(model).items()):
                    if self._superseded(model, plan):
                        break
                    keep = sorted(
                        set(want.get(layer, ())) | {e for e in ids if (layer, e) not in covered}
                    )
                    if tuple(keep) == ids:
                        continue
                    bank = self.service.bank(model, layer)
                    trimmed = None
                    if keep and bank is not None:
                        trimmed = await run_blocking(
                            lambda bank=bank, keep=keep: bank.subset(keep), "expert-trim"
                        )
                    if self._superseded(model, plan):  # (while this layer was trimmed)
                        break
                    self.service.replace_layer(model, layer, trimmed)
                self._publish_shards()
            await run_blocking(release_free_memory, "memory-release")
            self._load_errors.pop(model, None)
            self._failures.pop(model, None)
            log.info(
                "holding %d experts of %s (%d bytes)",
                sum(len(v) for v in self.service.held(model).values()),
                model,
                self.service.nbytes(model),
            )
        except Exception as exc:  # reported; retried after a backoff (1 s, 2 s, ... 60 s)
            failures = self._failures.get(model, 0) + 1
            self._failures[model] = failures
            delay = min(60.0, 2.0 ** (failures - 1))
            self._retry_at[model] = time.monotonic() + delay
            asyncio.get_running_loop().call_later(delay, self._kick.set)
            log.error(
                "could not load this node's experts of %s (retry in %.0f s): %s", model, delay, exc
            )
            self._load_errors[model] = f"loading experts failed: {exc}"
        finally:
            self._kick.set()
            for callback in self._changed:
                callback()

    def _superseded(self, model: str, plan: ExpertPlan) -> bool:
        """A newer plan than `plan` came (the reconcile after this one follows it)."""
        current = self.plans.get(model)
        return current is None or current.plan.fingerprint != plan.fingerprint

    def _published(self, model: str) -> dict[NodeId, dict[int, set[int]]]:
        """node -> layer -> experts of `model`, as each live node publishes holding them."""
        published: dict[NodeId, dict[int, set[int]]] = {}
        for member in self.table:
            if member.live and member.state is not None:
                for shard in member.state.expert_shards:
                    if shard.model == model:
                        published.setdefault(member.node_id, {})[shard.layer] = set(shard.experts)
        return published

    def _realized(self, model: str, plan: ExpertPlan) -> bool:
        """Every expert's planned holders (other than this node) publish that they hold it."""
        published = self._published(model)
        for node, layers in plan.assignments.items():
            if node == self.node_id or not self.participates(node):
                continue
            for layer, ids in layers.items():
                if not set(ids) <= published.get(node, {}).get(layer, set()):
                    return False
        return True

    def _publish_model(self, model: str, **changes: Any) -> None:
        """Change fields of this node's gossiped ModelInfo of `model` (if it offers it)."""
        infos = self.membership.self_state.current.models_on_disk
        if any(i.name == model for i in infos):
            self.membership.update_state(
                models_on_disk=[_with(i, **changes) if i.name == model else i for i in infos]
            )

    def _publish_shards(self) -> None:
        shards = [
            ExpertShard(model, layer, list(ids))
            for model in self.service.models()
            for layer, ids in sorted(self.service.held(model).items())
        ]
        self.membership.update_state(expert_shards=shards)
        self._table_changed.set()

    # ---- the host's engine
    def build_model(self, resolved: ResolvedModel, max_seq_len: int | None, loop):
        """Loads the trunk (blocking; on the engine's thread) with every MoE layer's experts
        computed by RemoteExperts: local ones from this node's service, the rest remotely."""
        model = load_model(
            resolved.path,
            plan=LoadPlan.trunk(),
            dtype=self.dtype,
            device=self.device,
            max_seq_len=max_seq_len,
        )
        name = resolved.name
        routes = self.routes.setdefault(name, ExpertRoutes())
        stats = self.stats.setdefault(name, DispatchStats())
        lanes = None
        if self.config.lanes:
            lanes = ExpertLanes(name, ExpressClient(self.endpoint.registry))
            old = self.lanes.get(name)
            self.lanes[name] = lanes
            if old is not None:
                old.close()
        for layer in model.moe_layers():
            layer.experts = RemoteExperts(
                layer.layer,
                lambda index=layer.layer: self.service.bank(name, index),
                routes,
                lambda peer, index, experts, counts, rows, token_of, weights: self._call_peer(
                    name, peer, index, experts, counts, rows, token_of, weights
                ),
                loop,
                stats,
                self.config.dispatch,
                lanes,
            )
        return model

    async def _call_peer(
        self,
        model: str,
        peer: NodeId,
        layer: int,
        experts: list[int],
        counts: list[int],
        rows: torch.Tensor,
        token_of: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """The peer's weighted partial sums for `rows` (see ExpertCall), [len(rows), H] F32."""
        conn = await connect_member(
            self.endpoint, self.table, peer, timeout=self.config.connect_timeout
        )
        if conn is None:
            raise PeerGone(f"{peer.short} unreachable")
        pieces = split_call(experts, counts, rows_per_call(rows))
        if len(pieces) == 1:
            partial = await self._request(
                conn, peer, model, layer, experts, counts, rows, token_of, weights
            )
            lanes = self.lanes.get(model)
            if lanes is not None and lanes.wants(peer):
                self.spawn(self._open_lane(lanes, peer, conn))
            return partial
        total = torch.zeros(rows.shape[0], rows.shape[1], dtype=torch.float32)
        at = 0
        for piece_experts, piece_counts in pieces:  # only for huge prefills
            n = sum(piece_counts)
            tokens, inverse = torch.unique(token_of[at : at + n].cpu(), return_inverse=True)
            partial = await self._request(
                conn,
                peer,
                model,
                layer,
                piece_experts,
                piece_counts,
                rows.index_select(0, tokens.to(rows.device)),
                inverse,
                weights[at : at + n],
            )
            total.index_add_(0, tokens, partial)
            at += n
        return total

    async def _open_lane(self, lanes: ExpertLanes, peer: NodeId, conn) -> None:
        """Ask `peer` for an express lane for `lanes`' model's calls (see lanes.py)."""
        secret = os.urandom(SECRET_SIZE)
        try:
            reply = await conn.request(ExpressOpen(secret), timeout=self.config.connect_timeout)
            if not isinstance(reply, ExpressLane):
                raise RemoteError(ErrorCode.UNEXPECTED_MESSAGE, type(reply).__name__)
            address = (conn.remote_ip, reply.port)  # (remote_address: maybe a name)
            # one Ping first, off the engine's thread: a lane whose port a firewall blocks is
            # never used (its first call would stall a decode step until it gave up)
            start = await asyncio.to_thread(
                probe_lane,
                self.endpoint.registry,
                address,
                reply.lane,
                secret,
                min(self.config.connect_timeout, 2.0),
            )
            if not conn.is_open:  # closed during the probe: the peer forgot the lane with it
                lanes.refused(peer, 0.0)  # a call over the next connection may open another
                return
            lanes.add(peer, conn, address, reply.lane, secret, start)
        except BaseException as exc:
            # a node without lanes answers NOT_SUPPORTED: ask it no more
            never = isinstance(exc, RemoteError) and exc.code == ErrorCode.NOT_SUPPORTED
            lanes.refused(peer, None if never else lanes.retry_after)
            if not isinstance(exc, (TransportError, TimeoutError, OSError, ValueError)):
                raise  # cancelled, or a bug
            log.info("no express lane to %s: %s", peer.short, exc)

    async def _request(self, conn, peer, model, layer, experts, counts, rows, token_of, weights):
        call = weighted_call(model, layer, experts, counts, rows, token_of, weights)
        member = self.table.get(peer)
        if member is None or member.status != ALIVE:
            raise self._gone(peer)
        task = asyncio.current_task()
        assert task is not None
        calls = self._calls.setdefault(peer, set())
        calls.add(task)
        try:
            reply = await conn.request(call, timeout=self.config.dispatch.call_timeout)
        except asyncio.CancelledError:
            if task not in self._dropped:
                raise
            task.uncancel()
            raise self._gone(peer) from None
        finally:
            self._dropped.discard(task)
            calls.discard(task)
            if not calls and self._calls.get(peer) is calls:
                del self._calls[peer]
        return partial_sums(reply, rows, peer)

    def _gone(self, peer: NodeId) -> PeerGone:
        member = self.table.get(peer)
        return PeerGone(f"{peer.short} {STATUS_PHRASES[member.status] if member else 'is gone'}")

    async def wait_covered(self, model: str, timeout: float) -> None:
        """Until every expert of `model` has a holder (this node or a live peer); TimeoutError
        (saying how many are missing) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self._table_changed.clear()  # before looking: a change while we look is not lost
            self._update_routes(model)
            missing = self.coverage(model)
            if not missing:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                error = self.errors.get(model)
                raise TimeoutError(
                    f"{counted(len(missing), 'expert')} of {model} held by no node after "
                    f"{timeout:.0f}s" + (f": {error}" if error else "")
                )
            # peers publish what they load; this node's own loads signal it too. Not
            # asyncio.wait_for: on Python 3.11 it returns the event's result when a cancellation
            # comes at the moment the event is set, swallowing the cancellation, and this loop
            # then ran on until its deadline with the node's stop() waiting on it
            try:
                async with asyncio.timeout(min(remaining, 10.0)):
                    await self._table_changed.wait()
            except TimeoutError:
                waiting = counted(len(missing), "expert")
                log.info("%s: waiting for %s to be loaded somewhere", model, waiting)

    # ---- status
    def status(self) -> list[dict[str, Any]]:
        """The "experts" section of the status document."""
        sections = []
        errors = self.errors
        for model in sorted(set(self.plans) | set(errors)):
            entry = self.plans.get(model)
            section: dict[str, Any] = {"model": model, "error": errors.get(model)}
            if entry is not None:
                section.update(entry.plan.to_dict())
                section["rankings"] = entry.inputs[2]
                section["held"] = self._held_bytes(model)
                following = {
                    str(node): info.expert_plan
                    for node, info in self.offers_of(model)
                    if info.expert_budget > 0 or node == entry.plan.host
                }
                section["following"] = following  # the plan each node says it follows
                section["agreed"] = set(following.values()) == {entry.plan.fingerprint}
            stats = self.stats.get(model)
            if stats is not None:
                section["dispatch"] = {
                    "steps": stats.steps,
                    "remote_calls": stats.remote_calls,
                    "failovers": stats.failovers,
                    "wait_seconds": round(stats.wait_seconds, 6),
                    "step_seconds": round(stats.step_seconds, 6),
                }
            lanes = self.lanes.get(model)
            if lanes is not None and stats is not None:
                section["dispatch"].update(lanes.status())
            sections.append(section)
        return sections

    def _held_bytes(self, model: str) -> dict[str, int]:
        """Bytes each live node publishes it holds of `model` (from expert_shards)."""
        shape = self._shapes.get(model)
        per_expert = shape[2] if shape else 0
        return {
            str(node): per_expert * sum(len(experts) for experts in layers.values())
            for node, layers in self._published(model).items()
        }


def _checkpoint_of(infos: Sequence[ModelInfo], model: str) -> str | None:
    """The checkpoint a node gossips for its copy of `model` (its first entry, as offers_of
    reads it); None when it lists no such model."""
    return next((i.checkpoint for i in infos if i.name == model), None)


def _with(info: ModelInfo, **changes: Any) -> ModelInfo:
    return dataclasses.replace(info, **changes)
