"""The gateway: any node answers for any model in the mesh.

For each request it picks a ready host (routing.rank_hosts: affinity, then load), runs the
completion there (the local engine, or a QUIC tunnel), and streams the deltas back. When
the host fails before the first token, the request simply goes to the next host; when it
fails mid-stream, the prompt plus the tokens already sent go to another host, which
continues after them, so the client's stream goes on (for greedy requests the text equals
an uninterrupted run). When no host is ready yet but one is elected, it waits for it
(bounded); when none can be, it says so.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mesh_node.english import counted
from mesh_node.identity import NodeId
from mesh_node.membership.claims import ALIVE, SUSPECT
from mesh_node.membership.dialing import connect_member
from mesh_node.membership.table import CONTACT, PeerTable
from mesh_node.placement.shards import shard_for_session
from mesh_node.serving.hosting import Hosting
from mesh_node.serving.local import LocalModels
from mesh_node.serving.requests import (
    CompletionRequest,
    Delta,
    GenerationFailed,
    ModelNotFound,
    NoHostAvailable,
    Overloaded,
)
from mesh_node.serving.routing import HostLoad, affinity_key, rank_hosts
from mesh_node.serving.tunnel import HostBusy, HostFailed, HostNotServing, stream_from_host
from mesh_node.transport.endpoint import Endpoint

log = logging.getLogger("mesh_node.gateway")


@dataclass(frozen=True)
class GatewayConfig:
    host_wait: float = 30.0  # how long a request waits for an elected host to be ready
    item_timeout: float = 120.0  # longest wait for the next token from a host
    connect_timeout: float = 5.0
    max_failovers: int = 3  # hosts that may fail under one request before it gives up
    max_stale_tries: int = 16  # hosts that may say "not serving it" to one request
    busy_backoff: float = 0.25  # a host that said "busy" is asked again after this (doubling)
    failed_rest: float = 0.5  # a host that failed a request, still a member, is asked again
    # after this (doubling), when no other host can take it
    affinity_slack: int = 2


class Gateway:
    """The `Backend` behind every node's API."""

    def __init__(
        self,
        node_id: NodeId,
        endpoint: Endpoint,
        table: PeerTable,
        local: LocalModels,
        hosting: Hosting | None = None,
        *,
        config: GatewayConfig | None = None,
    ):
        self.node_id = node_id
        self.endpoint = endpoint
        self.table = table
        self.local = local
        self.hosting = hosting
        self.config = config or GatewayConfig()
        self._sent: collections.Counter[NodeId] = collections.Counter()  # in flight, by host
        self._changed = asyncio.Event()
        table.subscribe(self._on_table_change)

    def _on_table_change(self, member, what: str) -> None:
        if what != CONTACT:  # (hearing from a peer changes no host's offer)
            self._changed.set()

    # ---- what the mesh offers
    def model_ids(self) -> list[str]:
        names = set(self.local.generators)
        for member in self.table:
            if member.live and member.state is not None:
                names.update(m.name for m in member.state.models_on_disk)
                names.update(member.state.models_served)
        return sorted(names)

    def _ready_hosts(self, model: str) -> list[HostLoad]:
        """Hosts advertising the model, alive ones (suspects only when no one else is)."""
        ready: dict[str, list[HostLoad]] = {ALIVE: [], SUSPECT: []}
        for member in self.table:
            state = member.state
            if member.status not in ready or state is None or model not in state.models_served:
                continue
            if member.node_id == self.node_id and model not in self.local.generators:
                continue  # being unloaded here
            load = state.load.inflight + self._sent[member.node_id]
            ready[member.status].append(HostLoad(member.node_id, load))
        return ready[ALIVE] or ready[SUSPECT]

    def _electable(self, model: str) -> bool:
        """Someone is (or is about to be) elected for the model: worth waiting for."""
        if self.hosting is not None:
            self.hosting.evaluate()
            election = self.hosting.elections.get(model)
            return election is not None and bool(election.hosts)
        return False

    def _copy_on(self, node_id: NodeId, model: str) -> str:
        return _copy_of(self.table.get(node_id), model)

    def _holds_copy(self, model: str, copy: str) -> bool:
        """Some live node has the model's `copy` on disk (hosts it, or may come to)."""
        return any(member.live and _copy_of(member, model) == copy for member in self.table)

    def _state_version(self, node_id: NodeId) -> int | None:
        member = self.table.get(node_id)
        return None if member is None else member.state_version

    async def _choose(
        self,
        request: CompletionRequest,
        stale: dict[NodeId, int | None],
        resting: dict[NodeId, float] | None = None,
        copy: str | None = None,
    ) -> NodeId:
        """A ready host for the request, not in `stale` (a host that said it does not serve
        the model) while its gossiped state is the one it had when it said so, nor in
        `resting` before the loop time it maps to (a host that said it was full, or failed
        this request: asked again later while it is a live member, for its failure may have
        been a blip); with a `copy`, one whose checkpoint is that (an answer under way goes
        on with the model it began on: another checkpoint under the same name would splice
        two models' text)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.host_wait
        key = affinity_key(request)
        resting = resting or {}
        while True:
            now = loop.time()
            backing_off = {n for n, until in resting.items() if until > now}
            skip = set(backing_off)
            skip |= {n for n, v in stale.items() if self._state_version(n) == v}
            hosts = [h for h in self._ready_hosts(request.model) if h.node_id not in skip]
            if copy is not None:
                hosts = [h for h in hosts if self._copy_on(h.node_id, request.model) == copy]
            if hosts and self.hosting is not None and self.hosting.is_sharded(request.model):
                # independent shards answer differently: a session stays on its shard
                chosen = shard_for_session(key.hex(), [str(h.node_id) for h in hosts])
                return next(h.node_id for h in hosts if str(h.node_id) == chosen)
            if hosts:
                return rank_hosts(hosts, key, self.config.affinity_slack)[0]
            if request.model not in self.model_ids():
                raise ModelNotFound(f"no node in the mesh has model {request.model!r}", "model")
            if copy is not None and not self._holds_copy(request.model, copy):
                raise GenerationFailed(
                    f"no live node has the checkpoint of {request.model} this answer began on "
                    f"({copy or 'unknown'}); the nodes that have {request.model} hold another "
                    "copy under that name, and continuing there would mix two models"
                )
            if not self._electable(request.model) and not resting:
                raise NoHostAvailable(
                    f"no node can host {request.model} now (none has it with enough free memory)"
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise NoHostAvailable(f"no host of {request.model} became ready in time")
            wait = min(remaining, 1.0, *(resting[n] - now for n in backing_off))
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.0)):
                    await self._changed.wait()

    # ---- running requests
    @contextlib.asynccontextmanager
    async def stream(self, request: CompletionRequest) -> AsyncIterator[AsyncIterator[Delta]]:
        deltas = self._generate(request)
        try:
            yield deltas
        finally:
            await deltas.aclose()  # a client that left cancels the generation on its host

    async def _generate(self, request: CompletionRequest) -> AsyncIterator[Delta]:
        delivered: list[int] = []  # token ids the client already has
        loop = asyncio.get_running_loop()
        failures: collections.Counter[NodeId] = collections.Counter()  # hosts that failed it
        busy: dict[NodeId, float] = {}  # said they were full: not asked again before this time
        resting: dict[NodeId, float] = {}  # failed it: not asked again before this time
        backoff = self.config.busy_backoff
        first_busy: float | None = None
        stale: dict[NodeId, int | None] = {}  # said they do not serve it: skipped till they change
        stale_tries = 0
        copy: str | None = None  # checkpoint of the host that sent the first tokens
        while True:
            try:
                host = await self._choose(request, stale, _later_of(busy, resting), copy)
            except ModelNotFound:
                if not failures:
                    raise
                # its hosts failed (they died or left) and no node has it now: the model
                # existed, the generation broke off (a server error a client may retry)
                where = f" after {counted(len(delivered), 'token')}" if delivered else ""
                raise GenerationFailed(
                    f"the generation broke off{where}: the hosts of {request.model} failed "
                    "and no other node has it now"
                ) from None
            attempt = dataclasses.replace(
                request, generated_ids=request.generated_ids + tuple(delivered)
            )
            self._sent[host] += 1
            try:
                async for delta in self._run_on(host, attempt):
                    if copy is None and delta.token_ids:
                        copy = self._copy_on(host, request.model)
                    delivered.extend(delta.token_ids)
                    yield delta
                    if delta.finish_reason is not None:
                        return
                raise HostFailed("the host ended the stream before the answer was complete")
            except HostBusy:
                now = loop.time()
                busy[host] = now + backoff
                backoff = min(backoff * 2, 2.0)
                first_busy = now if first_busy is None else first_busy
                others = [
                    h
                    for h in self._ready_hosts(request.model)
                    if h.node_id not in failures and h.node_id not in busy
                ]
                # before the first token the client may as well retry later itself (429);
                # an answer already under way waits a little for a host to have room
                if not others and (not delivered or now - first_busy > self.config.host_wait):
                    raise Overloaded(
                        f"every host of {request.model} is busy; retry later"
                    ) from None
            except HostNotServing as exc:
                # our view of it was stale (it just unloaded, or has not loaded yet): not a
                # failure of the host; it may be chosen again once its state has changed
                stale[host] = self._state_version(host)
                stale_tries += 1
                log.info("host %s does not serve %s now: %s", host.short, request.model, exc)
                if stale_tries > self.config.max_stale_tries:
                    raise GenerationFailed(
                        f"hosts of {request.model} kept saying they do not serve it; giving up"
                    ) from None
            except HostFailed as exc:
                failures[host] += 1
                where = (
                    "before the first token"
                    if not delivered
                    else f"after {counted(len(delivered), 'token')}"
                )
                log.warning("host %s failed %s: %s", host.short, where, exc)
                total = sum(failures.values())
                if total > self.config.max_failovers:
                    on = counted(len(failures), "host")
                    raise GenerationFailed(
                        f"this request failed {counted(total, 'time')} (on {on}); giving up "
                        f"(the last: host {host.short} failed {where}: {exc})"
                    ) from None
                # other hosts first; this one again later if it is still a member (a link
                # that blipped for a second does not end the answer when it is the only host)
                rest = self.config.failed_rest * 2 ** (failures[host] - 1)
                resting[host] = loop.time() + rest
            finally:
                self._sent[host] -= 1
                if not self._sent[host]:
                    del self._sent[host]

    async def _run_on(self, host: NodeId, request: CompletionRequest) -> AsyncIterator[Delta]:
        if host == self.node_id:
            try:
                async with self.local.stream(request) as deltas:
                    async for delta in deltas:
                        yield delta
            except Overloaded as exc:
                raise HostBusy(exc.message) from None
            except ModelNotFound as exc:  # just unloaded, or not loaded yet
                raise HostNotServing(exc.message) from None
            except (NoHostAvailable, GenerationFailed) as exc:  # shutting down
                raise HostFailed(exc.message) from None
            return
        conn = await connect_member(
            self.endpoint, self.table, host, timeout=self.config.connect_timeout
        )
        if conn is None:
            raise HostFailed("this node could not connect to it")
        async for delta in stream_from_host(conn, request, item_timeout=self.config.item_timeout):
            yield delta


def _copy_of(member, model: str) -> str:
    """The checkpoint (ModelInfo.checkpoint) of the member's copy of the model; "" when it
    gossips none (unknown, as from a node that does not say)."""
    if member is None or member.state is None:
        return ""
    return next((m.checkpoint for m in member.state.models_on_disk if m.name == model), "")


def _later_of(*times: dict[NodeId, float]) -> dict[NodeId, float]:
    """Per node, the latest of the loop times the maps give."""
    merged: dict[NodeId, float] = {}
    for each in times:
        for node, until in each.items():
            merged[node] = max(until, merged.get(node, until))
    return merged
