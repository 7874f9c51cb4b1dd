"""Hosting: this node runs the models the election gives it, and says so.

Every node publishes the models it has on disk. Whenever the mesh changes, each node runs
the election (placement.election) for every model in the mesh; a node elected for a model
it has loads it (off the event loop) and then adds it to its `models_served`, which is when
routers start sending it requests. A node no longer elected stops advertising the model
first, lets its requests finish (bounded), then unloads it. Load (requests in flight,
tokens/s) is published every few seconds while it changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mesh_node.blocking import close_quietly, run_blocking
from mesh_node.cancellation import cancel_and_wait
from mesh_node.engine import Generator
from mesh_node.engine.catalog import ResolvedModel, describe_model
from mesh_node.engine.host_memory import release_free_memory
from mesh_node.engine.tokenizer import Tokenizer
from mesh_node.expert_parallel.coordinator import ExpertParallel
from mesh_node.expert_parallel.core_share import decode_threads
from mesh_node.expert_parallel.independent_shards import IndependentShards
from mesh_node.membership.messages import Load, ModelInfo
from mesh_node.membership.swim import Membership
from mesh_node.membership.table import CONTACT, PeerTable
from mesh_node.placement.election import HEADROOM, Election, NodeView, elect, fits
from mesh_node.placement.rankings import checkpoint_fingerprint
from mesh_node.serving.local import LocalModels

log = logging.getLogger("mesh_node.hosting")


class _NotCovered(Exception):
    """A split model's experts did not all find holders in time (the inputs may change)."""


@dataclass(frozen=True)
class HostingConfig:
    device: str = "auto"
    dtype: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_seq_len: int = 4096
    load_interval: float = 2.0  # seconds between load reports (when load changed)
    drain_timeout: float = 30.0  # how long an unloading model may finish its requests
    settle: float = 0.2  # re-elect at most this often while the mesh is changing
    join_settle: float = 3.0  # at most this long, after start, learning the mesh before electing
    cover_timeout: float = 600.0  # a split model's host gives up if its experts are not all held
    # a model whose engine died (Generator.failure) is loaded again after this
    revive_delay: float = 10.0


def node_views(table: PeerTable) -> list[NodeView]:
    """Election inputs from the gossiped states (GPU memory where a node has GPUs)."""
    views = []
    for member in table:
        state = member.state
        if state is None:
            continue
        hardware = state.hardware
        if hardware is None:
            total = free = 0
        elif hardware.gpus:
            total = max(g.vram_total for g in hardware.gpus)
            free = max(g.vram_free for g in hardware.gpus)
        else:
            total, free = hardware.ram_total, hardware.ram_free
        views.append(
            NodeView(
                member.node_id,
                member.live,
                state.role,
                total,
                free,
                {m.name: _room_needed(m) for m in state.models_on_disk},
                # a split model's host publishes its rankings before its long load: it counts
                # as hosting already, or nodes joining meanwhile would elect themselves
                frozenset(state.models_served)
                | {m.name for m in state.models_on_disk if m.rankings},
                state.load.inflight,
            )
        )
    return views


class Hosting:
    def __init__(
        self,
        membership: Membership,
        local: LocalModels,
        offered: Sequence[ResolvedModel],
        *,
        config: HostingConfig | None = None,
        client: bool = False,
        load_generator: Callable[[ResolvedModel, HostingConfig], Generator] | None = None,
        experts: ExpertParallel | None = None,
        shards: IndependentShards | None = None,
    ):
        self.membership = membership
        self.local = local
        self.offered = {m.name: m for m in offered} if not client else {}
        self.config = config or HostingConfig()
        self.client = client
        self._load_generator = load_generator or _load_generator
        self.experts = experts
        self.shards = shards
        self.elections: dict[str, Election] = {}
        self.failed: dict[str, str] = {}  # model -> why it could not be loaded here
        self._busy: set[str] = set()  # models being loaded or unloaded
        self._split_loaded: set[str] = set()  # models whose generator here runs split
        self._retry_at: dict[str, float] = {}  # model -> no new load before (monotonic)
        self._draining: set[Generator] = set()  # replaced or unloaded, finishing requests
        self._kick = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed_callbacks: list[Callable[[], None]] = []
        self._other_copies: set[tuple[str, Any, str]] = set()  # (said once each)

    @property
    def node_id(self):
        return self.membership.node_id

    def on_change(self, callback: Callable[[], None]) -> None:
        """Called after elections or hosting changed (for the console)."""
        self._changed_callbacks.append(callback)

    async def start(self) -> None:
        infos = await asyncio.to_thread(
            lambda: [
                (describe_model(m.name, m.path, m.source), _copy_of(m))
                for m in self.offered.values()
            ]
        )
        on_disk = []
        for info, copy in infos:
            if info.error:
                log.error("cannot offer model %s: %s", info.name, info.error)
                self.failed[info.name] = info.error
                self.offered.pop(info.name, None)
                continue
            on_disk.append(
                ModelInfo(
                    info.name,
                    info.architecture,
                    info.size_bytes,
                    info.parameters,
                    info.experts,
                    checkpoint=copy,
                )
            )
        if self.experts is not None:
            experts, offered = self.experts, list(self.offered.values())
            on_disk = await asyncio.to_thread(lambda: experts.describe(offered, on_disk))
        if self.shards is not None:
            on_disk = self.shards.describe(on_disk)
        self.membership.update_state(models_on_disk=on_disk, role=self._role())
        self.membership.table.subscribe(self._on_table_change)
        self._spawn(self._election_loop())
        self._spawn(self._load_loop())
        self._kick.set()

    def _on_table_change(self, member, what: str) -> None:
        if what != CONTACT:  # (hearing from a peer changes no election)
            self._kick.set()

    async def stop(self) -> None:
        await cancel_and_wait(list(self._tasks))
        generators, self.local.generators = dict(self.local.generators), {}
        for name, generator in generators.items():
            log.info("unloading %s", name)
            await run_blocking(generator.close, "model-unload")
        draining, self._draining = list(self._draining), set()
        for generator in draining:  # stopped in the middle of their drain
            await run_blocking(generator.close, "model-unload")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _role(self) -> str:
        if self.client:
            return "client"
        return "host" if self.local.generators else "worker"

    def _publish_serving(self) -> None:
        self.membership.update_state(models_served=sorted(self.local.generators), role=self._role())
        for callback in self._changed_callbacks:
            callback()

    # ---- elections
    async def _election_loop(self) -> None:
        # a joiner first learns who is there and what they serve, or it would elect itself
        await self.membership.settled(timeout=self.config.join_settle)
        while True:
            await self._kick.wait()
            await asyncio.sleep(self.config.settle)
            self._kick.clear()
            try:
                self.evaluate()
            except Exception:  # a bug must not stop elections for good: say it, go on
                log.exception("host election failed")

    def models_in_mesh(self) -> set[str]:
        names: set[str] = set()
        for member in self.membership.table:
            if member.live and member.state is not None:
                names.update(m.name for m in member.state.models_on_disk)
                names.update(member.state.models_served)
        return names

    def evaluate(self) -> None:
        views = node_views(self.membership.table)
        elections = {
            model: self._shard_election(model)
            if self.is_sharded(model)
            else elect(model, views, max_hosts=1 if self._split(model) else None)
            for model in sorted(self.models_in_mesh())
        }
        changed = elections != self.elections
        self.elections = elections
        for model, election in elections.items():
            if model in self._busy:
                continue
            elected = self.node_id in election.hosts
            if elected and model not in self.local.generators and model in self.offered:
                if time.monotonic() < self._retry_at.get(model, 0.0):
                    continue  # its experts found no holders lately: a later kick retries
                self._busy.add(model)
                self._spawn(self._load(model))
            elif not elected and model in self.local.generators:
                self._busy.add(model)
                self._spawn(self._unload(model))
            elif elected and model in self.local.generators and self._reshard(model):
                self._busy.add(model)
                self._spawn(self._reload(model, "the shards changed: loading this node's"))
            elif elected and model in self._split_loaded and not self._split(model):
                # no node offers memory for its experts any more (they left): the trunk
                # alone cannot answer; this node was elected for the whole model
                self._busy.add(model)
                self._spawn(self._reload(model, "no longer split: loading the whole"))
        for model, generator in self.local.generators.items():
            if self._split(model):
                self._share_cores(model, generator)
        self._say_other_copies()
        if changed:
            for callback in self._changed_callbacks:
                callback()

    def _say_other_copies(self) -> None:
        """Warn, once per node and copy, of a live node holding another checkpoint under the
        name of a model this node offers: the text a client gets then depends on the host it
        reaches, and an answer under way does not fail over between the two (a split model's
        plan says so itself)."""
        mine = {m.name: m.checkpoint for m in self.membership.self_state.current.models_on_disk}
        for member in self.membership.table:
            if member.node_id == self.node_id or not member.live or member.state is None:
                continue
            for info in member.state.models_on_disk:
                copy = mine.get(info.name)
                if not copy or info.checkpoint in ("", copy) or self._split(info.name):
                    continue
                key = (info.name, member.node_id, info.checkpoint)
                if key in self._other_copies:
                    continue
                if len(self._other_copies) >= 1024:  # (bounded: a peer may gossip anything)
                    self._other_copies.clear()
                self._other_copies.add(key)
                log.warning(
                    "node %s holds another checkpoint of %s (%s) than this node (%s): clients "
                    "get either model's text, by the host they reach, and an answer does not "
                    "fail over from one to the other; keep one under another name (a folder's name "
                    "is its model's name)",
                    member.node_id.short,
                    info.name,
                    info.checkpoint,
                    copy,
                )

    def _split(self, model: str) -> bool:
        return self.experts is not None and self.experts.is_split(model)

    def is_sharded(self, model: str) -> bool:
        """`model` runs in independent-shard mode: every shard node hosts its own shard."""
        return self.shards is not None and self.shards.is_sharded(model)

    def _shard_election(self, model: str) -> Election:
        assert self.shards is not None
        nodes = tuple(self.shards.participants(model))
        return Election(model, nodes, nodes)

    def _reshard(self, model: str) -> bool:
        """The shard nodes changed since this node loaded its shard, or this node leads them
        now without having picked the rankings (the leader left): load the new split."""
        if not self.is_sharded(model):
            return False
        assert self.shards is not None
        wanted = self.shards.wanted(model)
        if wanted is None:
            return self.shards.must_lead(model)
        return wanted != self.shards.loaded(model)

    async def _reload(self, model: str, why: str) -> None:
        """The new generator (a new shard, or the whole model in place of a split one's trunk)
        is loaded while the old one keeps serving, then they are swapped and the old one
        drains: the model never lacks a ready host here during the change."""
        log.info("%s: %s model", model, why)
        was_split = model in self._split_loaded
        try:
            generator, split = await self._build(model)
        except Exception as exc:  # keep serving the old one; the next change retries
            log.error("could not reload %s: %s", model, exc)
            self._busy.discard(model)
            return
        old = self.local.generators.get(model)
        self.local.generators[model] = generator
        (self._split_loaded.add if split else self._split_loaded.discard)(model)
        self._publish_serving()
        try:
            if old is not None:
                await self._drain_and_close(old)
            if was_split and not split and self.experts is not None:
                self.experts.stop_hosting(model)
        finally:
            self._busy.discard(model)
        self._kick.set()

    async def _drain_and_close(self, generator: Generator) -> None:
        """Lets the generator finish its requests (at most drain_timeout), then closes it
        (`stop` closes it, should the node stop meanwhile)."""
        self._draining.add(generator)
        deadline = time.monotonic() + self.config.drain_timeout
        while time.monotonic() < deadline:
            stats = generator.stats()
            if stats.active + stats.queued == 0:
                break
            await asyncio.sleep(0.1)  # polling the engine's counters (bounded by the deadline)
        self._draining.discard(generator)
        await run_blocking(generator.close, "model-unload")
        await run_blocking(release_free_memory, "memory-release")

    async def _build(self, model: str) -> tuple[Generator, bool]:
        """A generator for `model` as the mesh wants it here now: this node's shard, the trunk
        of a split model, or the whole model; and whether it runs split."""
        resolved = self.offered[model]
        if self.is_sharded(model):
            assert self.shards is not None
            return await self.shards.load(resolved, self.config), False
        if self._split(model):
            assert self.experts is not None
            try:
                return await self._load_split(resolved), True
            except _NotCovered:
                # more memory may still come (nodes joining), so the host waited cover_timeout;
                # when no plan can hold the experts even so, it runs the whole model if it has
                # room, rather than wait again and again while the model is served nowhere
                lacking = self.experts.lacking_room(model)
                if lacking is None or not self._room_for_whole(model):
                    raise
                log.warning(
                    "%s: %s (after waiting %.0f s for more): hosting it whole here",
                    model,
                    lacking,
                    self.config.cover_timeout,
                )
        generator = await run_blocking(
            lambda: self._load_generator(resolved, self.config), "model-load", close_quietly
        )
        return generator, False

    def _room_for_whole(self, model: str) -> bool:
        """This node has room for the whole of `model` (not just the trunk a split model's
        host loads), by the election's measure."""
        me = next((v for v in node_views(self.membership.table) if v.node_id == self.node_id), None)
        info = next(
            (i for i in self.membership.self_state.current.models_on_disk if i.name == model), None
        )
        if me is None or info is None:
            return False
        whole = dataclasses.replace(me, models_on_disk={model: info.bytes})
        return fits(whole, model, HEADROOM)

    async def _load(self, model: str) -> None:
        split = self._split(model)
        log.info("elected to host %s: loading it%s", model, " (experts split)" if split else "")
        started = time.monotonic()
        try:
            generator, split = await self._build(model)
        except _NotCovered as exc:  # the offers may change: keep offering, retry later
            log.error("could not host %s yet: %s", model, exc)
            self.failed[model] = str(exc)
            self._retry_at[model] = time.monotonic() + self.config.cover_timeout
            asyncio.get_running_loop().call_later(self.config.cover_timeout, self._kick.set)
            self._busy.discard(model)
            return
        except Exception as exc:
            log.error("could not load %s: %s", model, exc)
            self.failed[model] = str(exc)
            self.offered.pop(model, None)  # no longer offered: the election moves on
            self.membership.update_state(
                models_on_disk=[
                    m for m in self.membership.self_state.current.models_on_disk if m.name != model
                ]
            )
            return
        finally:
            self._busy.discard(model)
        self.local.generators[model] = generator
        (self._split_loaded.add if split else self._split_loaded.discard)(model)
        self.failed.pop(model, None)
        log.info("hosting %s (loaded in %.1fs)", model, time.monotonic() - started)
        self._publish_serving()
        self._kick.set()  # the world may have moved on while loading

    async def _load_split(self, resolved: ResolvedModel) -> Generator:
        """The trunk here, the routed experts wherever the plan puts them; ready once every
        expert has a holder."""
        experts = self.experts
        assert experts is not None
        await experts.choose_rankings(resolved.name)
        loop = asyncio.get_running_loop()
        config = self.config

        def loader():
            model = experts.build_model(resolved, config.max_seq_len, loop)
            return model, Tokenizer(resolved.path, extra_eos_ids=model.args.eos_token_ids)

        try:
            generator = await run_blocking(
                lambda: Generator(
                    loader=loader,
                    max_batch=config.max_batch,
                    max_queue=config.max_queue,
                    max_seq_len=config.max_seq_len,
                ),
                "model-load",
                close_quietly,
            )
        except BaseException:
            experts.stop_hosting(resolved.name)
            raise
        try:
            await experts.wait_covered(resolved.name, timeout=config.cover_timeout)
        except BaseException as exc:  # not covered in time (or stopping): give the host role up
            experts.stop_hosting(resolved.name)
            await run_blocking(generator.close, "model-unload")
            if isinstance(exc, TimeoutError):
                raise _NotCovered(str(exc)) from None
            raise
        self._share_cores(resolved.name, generator)
        return generator

    def _share_cores(self, model: str, generator: Generator) -> None:
        """A split host's decode threads: fewer when expert peers share this machine."""
        assert self.experts is not None
        peers = self.experts.colocated_peers(model)
        threads = decode_threads(peers, generator.prefill_threads)
        if threads != generator.decode_threads_override:
            log.info(
                "%s: %d expert peer(s) on this machine: decode on %s intra-op thread(s)",
                model,
                peers,
                threads or "the engine's default number of",
            )
            generator.set_decode_threads(threads)

    async def _unload(self, model: str) -> None:
        try:
            generator = self.local.generators.pop(model)
            self._split_loaded.discard(model)
            log.info("no longer elected for %s: draining, then unloading", model)
            self._publish_serving()  # routers stop sending here
            await self._drain_and_close(generator)
            if self.experts is not None:
                self.experts.stop_hosting(model)
            if self.shards is not None:
                self.shards.forget(model)
        finally:
            self._busy.discard(model)
        self._kick.set()

    async def _replace_dead(self, model: str, generator: Generator) -> None:
        """The model's engine worker died (a bug or a device fault; its requests failed and
        the gateway sent them elsewhere): routers stop sending here at once, and the model is
        loaded afresh after `revive_delay` if this node is still elected for it."""
        try:
            log.error(
                "%s: the engine died (%r): withdrawn; loading it again in %.0f s",
                model,
                generator.failure,
                self.config.revive_delay,
            )
            if self.local.generators.get(model) is generator:
                del self.local.generators[model]
            self._split_loaded.discard(model)
            self.failed[model] = f"the engine died: {generator.failure!r}"
            self._retry_at[model] = time.monotonic() + self.config.revive_delay
            asyncio.get_running_loop().call_later(self.config.revive_delay, self._kick.set)
            self._publish_serving()
            if self.experts is not None:
                self.experts.stop_hosting(model)
            if self.shards is not None:
                self.shards.forget(model)
            await run_blocking(generator.close, "model-unload")
            await run_blocking(release_free_memory, "memory-release")
        finally:
            self._busy.discard(model)

    # ---- load reports
    async def _load_loop(self) -> None:
        # tokens counted by each generator (not model: a model loaded again is a new
        # generator, counting from 0) at the last report
        last_tokens: dict[int, int] = {}
        last_time = time.monotonic()
        while True:
            await asyncio.sleep(self.config.load_interval)
            try:
                last_time = self._report_load(last_tokens, last_time)
            except Exception:  # a bug must not stop load reports (and dead-engine checks)
                log.exception("load report failed")

    def _report_load(self, last_tokens: dict[int, int], last_time: float) -> float:
        generators = list(self.local.generators.items())
        for name, generator in generators:
            if generator.failure is not None and name not in self._busy:
                self._busy.add(name)
                self._spawn(self._replace_dead(name, generator))
        now = time.monotonic()
        inflight = 0
        produced = 0
        counts = {}
        for _, generator in generators:
            stats = generator.stats()
            inflight += stats.active + stats.queued
            counts[id(generator)] = stats.tokens_generated
            produced += stats.tokens_generated - last_tokens.get(
                id(generator), stats.tokens_generated
            )
        last_tokens.clear()
        last_tokens.update(counts)
        rate = round(max(produced, 0) / max(now - last_time, 1e-6), 1)
        self.membership.update_state(load=Load(inflight, rate))
        return now

    def status(self) -> list[dict[str, Any]]:
        """The "hosting" section of the console's status document."""
        ready = self._ready_hosts()
        return [
            {
                "model": model,
                "hosts": [str(h) for h in election.hosts],
                "ready": [str(h) for h in ready.get(model, [])],
                "eligible": [str(h) for h in election.eligible],
                "fingerprint": election.fingerprint,
            }
            for model, election in sorted(self.elections.items())
        ]

    def _ready_hosts(self) -> dict[str, list]:
        ready: dict[str, list] = {}
        for member in self.membership.table:
            if member.live and member.state is not None:
                for model in member.state.models_served:
                    ready.setdefault(model, []).append(member.node_id)
        return ready


def _copy_of(model: ResolvedModel) -> str:
    """ModelInfo.checkpoint of this node's copy of `model` (blocking: reads its headers and a
    few sampled blocks); "" when it cannot be read (describe_model then says why)."""
    try:
        return checkpoint_fingerprint(model.path)[:16]
    except OSError:
        return ""


def _room_needed(info: ModelInfo) -> int:
    """Bytes a host of this model loads: the trunk when its experts are split, else all."""
    return info.trunk_bytes if info.expert_budget else info.bytes


def _load_generator(resolved: ResolvedModel, config: HostingConfig) -> Generator:
    return Generator.from_pretrained(
        str(resolved.path),
        device=config.device,
        dtype=config.dtype,
        max_seq_len=config.max_seq_len,
        max_batch=config.max_batch,
        max_queue=config.max_queue,
    )
