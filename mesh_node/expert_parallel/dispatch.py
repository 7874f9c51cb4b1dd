"""The host side of expert parallelism: what a MoE layer's experts computer is when the experts
are spread over the mesh.

The engine's MoE layer routes; then, on its worker thread, it asks `run_combined(x, chosen,
weights)` for each token's gate-weighted sum over its k experts. `RemoteExperts` splits the
experts used: those this node holds run here, the others go to the peers holding them, ONE
call per peer per layer (an expert held by several peers goes to a peer that is already being
called when it can). Each peer gets the distinct tokens routed to it once (not once per
expert) with the gate weights, and answers one float32 partial sum per token; the host adds
the partials up. Compared with sending every (token, expert) row both ways this moves about
k times fewer bytes, which is what an expert call's time is made of (the QUIC stack costs
about 0.25 ms per KB round trip here). The math is the single node's: the same expert
products, the weighted sum in float32; only the order of that sum's terms differs (rounding
at the 1e-7 level). The calls are started first, then the local experts run while they are
in flight: a call that fits one datagram goes on the express lane to its peer when there is
one (lanes.py: the engine thread sends it and reads the answer itself), any other over QUIC
from the event loop; a lane call that gets no answer is made again over QUIC at once.

A peer that fails (timeout, connection lost, gone from the mesh, refusal) is dropped for the
rest of the step and its experts go to another holder (a replica) at once. When no live node
holds an expert, the step waits for the routes to change (the plan is recomputed and some
peer loads it) up to `holder_wait` seconds, then fails with `ExpertsUnavailable`: the request
gets a clear error, never a silently wrong answer. That error says what each peer tried last
answered. A refusal that asking again cannot change (BAD_REQUEST: say, rows in another dtype
than the peer holds; NOT_SUPPORTED) is not retried: when only such peers hold an expert the
step fails at once with their reason.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from mesh_node.engine.errors import ExpertsUnavailable, GeneratorClosedError
from mesh_node.engine.experts import ExpertBank
from mesh_node.expert_parallel.messages import ExpertCall, ExpertOutput
from mesh_node.identity import NodeId
from mesh_node.transport.errors import ErrorCode, RemoteError
from mesh_node.transport.express import ExpressFailed
from mesh_node.transport.tensors import Tensor

log = logging.getLogger("mesh_node.experts")

MAX_CALL_BYTES = 32 << 20  # rows per ExpertCall (the frame's blob limit is 64 MiB)


def rows_per_call(rows: torch.Tensor) -> int:
    """How many rows one ExpertCall carries at most (a huge prefill's call to a peer is made
    as several, one after another; the answers are float32)."""
    return max(1, MAX_CALL_BYTES // (rows.shape[1] * max(rows.element_size(), 4)))


# answers that asking the same peer again cannot change
_FINAL_REFUSALS = frozenset({ErrorCode.BAD_REQUEST, ErrorCode.NOT_SUPPORTED})


class PeerGone(Exception):
    """The peer left, was suspected, or could not be reached during an expert call."""


def weighted_call(model, layer, experts, counts, rows, token_of, weights) -> ExpertCall:
    """The ExpertCall (weighted form) asking a peer for these rows' partial sums."""
    return ExpertCall(
        model,
        layer,
        list(experts),
        list(counts),
        Tensor.from_torch(rows.contiguous()),
        token_of=token_of.tolist(),
        weights=Tensor.from_torch(weights.float().contiguous()),
    )


def partial_sums(reply: object, rows: torch.Tensor, peer: NodeId) -> torch.Tensor:
    """The F32 [len(rows), H] partial sums a peer answered; PeerGone for any other answer."""
    if not isinstance(reply, ExpertOutput):
        raise PeerGone(f"{peer.short} answered {type(reply).__name__}")
    outputs = reply.outputs.torch()
    if tuple(outputs.shape) != tuple(rows.shape) or outputs.dtype != torch.float32:
        raise PeerGone(f"{peer.short} answered {list(outputs.shape)} for {list(rows.shape)}")
    return outputs


@dataclass(frozen=True)
class DispatchConfig:
    call_timeout: float = 30.0  # one remote call, compute included
    call_slack: float = 5.0  # a peer call's wait beyond its calls' own timeouts (a backstop)
    holder_wait: float = 60.0  # how long a step waits for a missing expert to get a holder


FAILURE_MEMORY = 30.0  # seconds a peer whose call failed is asked after the other holders


class ExpertRoutes:
    """Who holds which expert of one model, as the engine thread reads it: a snapshot that the
    event loop replaces whole (`update`), with a condition the engine can wait on. It also
    remembers, for every layer of the model, which peers' calls failed lately: they are asked
    after the other holders of an expert, so a peer that stopped answering costs one call's
    timeout, not one in every layer of every step (until its experts move, or it answers)."""

    def __init__(
        self, failure_memory: float = FAILURE_MEMORY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._holders: dict[tuple[int, int], tuple[NodeId, ...]] = {}
        self._version = 0
        self._cond = threading.Condition()
        self._failure_memory = failure_memory
        self._clock = clock
        self._failed: dict[NodeId, float] = {}  # peer -> monotonic time its call failed
        self.closed: str | None = None  # why no call is made any more (the node is stopping)

    def close(self, reason: str) -> None:
        """No more calls: a step waiting for a holder (or about to call one) ends at once
        with `reason`, rather than retry until holder_wait while its node stops."""
        with self._cond:
            self.closed = reason
            self._version += 1
            self._cond.notify_all()

    def update(self, holders: dict[tuple[int, int], tuple[NodeId, ...]]) -> None:
        with self._cond:
            if holders == self._holders:
                return
            self._holders = holders
            self._version += 1
            self._cond.notify_all()

    @property
    def version(self) -> int:
        return self._version

    def holders(self, layer: int, expert: int) -> tuple[NodeId, ...]:
        """Remote nodes holding the expert, best first (alive before suspect, plan order;
        those whose calls failed lately last)."""
        holders = self._holders.get((layer, expert), ())
        if not self._failed or not any(h in self._failed for h in holders):
            return holders
        recent = self._clock() - self._failure_memory
        return tuple(sorted(holders, key=lambda h: self._failed.get(h, -math.inf) > recent))

    def call_failed(self, peer: NodeId) -> None:
        self._failed[peer] = self._clock()
        if len(self._failed) > 1024:  # (bounded: the oldest failures are forgotten)
            del self._failed[min(self._failed, key=self._failed.__getitem__)]

    def call_answered(self, peer: NodeId) -> None:
        self._failed.pop(peer, None)

    def wait_change(self, version: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._version != version, timeout)


# (peer, layer, experts, counts, rows, token_of, weights) -> partial sums [len(rows), H] float32;
# a coroutine run on the node's event loop (see ExpertCall, weighted form)
PeerCall = Callable[
    [NodeId, int, list[int], list[int], torch.Tensor, torch.Tensor, torch.Tensor],
    Awaitable[torch.Tensor],
]


@dataclass
class DispatchStats:
    steps: int = 0
    remote_calls: int = 0
    failovers: int = 0
    wait_seconds: float = 0.0  # time the engine waited for remote answers after its own work
    step_seconds: float = 0.0  # time in run_grouped with remote calls, all of it


class LaneCalls(Protocol):
    """Express lanes to peers (expert_parallel.lanes): `start` sends a call on the lane to
    `peer`, None when there is none or the call does not fit one; the handle's `result`
    raises ExpressFailed when no answer came, and the call then goes over QUIC."""

    def start(
        self, peer: NodeId, layer: int, experts, counts, rows, token_of, weights
    ) -> Pending | None: ...


class Pending(Protocol):
    def result(self, timeout: float) -> torch.Tensor: ...

    def cancel(self) -> Any: ...


class RemoteExperts(nn.Module):
    """The experts of one MoE layer of the host's model, local and remote. (A module without
    weights, so that it can take an `ExpertBank`'s place in the MoE layer.)"""

    def __init__(
        self,
        layer: int,
        local: Callable[[], ExpertBank | None],
        routes: ExpertRoutes,
        call: PeerCall,
        loop: asyncio.AbstractEventLoop,
        stats: DispatchStats,
        config: DispatchConfig | None = None,
        lanes: LaneCalls | None = None,
    ):
        super().__init__()
        self.layer = layer
        self._local = local
        self._routes = routes
        self._call = call
        self._loop = loop
        self._stats = stats
        self.config = config or DispatchConfig()
        self._lanes = lanes

    def _on_loop(self, args: tuple[Any, ...]) -> Pending:
        """The call made over QUIC, from the event loop."""
        return asyncio.run_coroutine_threadsafe(self._call(*args), self._loop)

    def run_combined(
        self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """x [N, H], chosen [N, k] expert ids, weights [N, k] float32 -> [N, H] float32: each
        token's gate-weighted sum over its k experts, wherever they are held."""
        k = chosen.shape[1]
        flat = chosen.reshape(-1).tolist()
        flat_weights = weights.reshape(-1).float()
        if x.shape[0] == 1:  # a decode step's token: all its experts here is one local call
            bank = self._local()
            if bank is not None and all(bank.holds(expert) for expert in flat):
                self._stats.steps += 1
                token_of = torch.zeros(k, dtype=torch.long, device=x.device)
                return bank.run_weighted(x, flat, [1] * k, token_of, flat_weights)
        pairs: dict[int, list[int]] = {}  # expert -> indices into flat (token = index // k)
        for i, expert in enumerate(flat):
            pairs.setdefault(expert, []).append(i)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        self._stats.steps += 1
        started = time.perf_counter()
        pending = sorted(pairs)
        failed: set[NodeId] = set()  # failed in this round of waiting: asked again later
        refused: set[NodeId] = set()  # refused for good: not asked again in this step
        last_error: dict[NodeId, str] = {}
        deadline = time.monotonic() + self.config.holder_wait
        while pending:
            if self._routes.closed is not None:  # (as a closed generator: callers fail over)
                raise GeneratorClosedError(
                    f"experts {pending} of layer {self.layer} were not computed: "
                    f"{self._routes.closed}"
                )
            version = self._routes.version
            bank = self._local()  # once per round: the loop may swap the bank meanwhile
            local, by_peer, orphans = self._assign(pending, failed | refused, bank)
            calls: dict[NodeId, tuple[torch.Tensor, Pending, tuple[Any, ...]]] = {}
            waits: dict[NodeId, float] = {}
            try:
                for peer, experts in by_peer.items():
                    tokens, rows, counts, token_of, pair_weights = _request_of(
                        x, experts, pairs, k, flat_weights
                    )
                    args = (peer, self.layer, experts, counts, rows, token_of, pair_weights)
                    lane = self._lanes.start(*args) if self._lanes is not None else None
                    calls[peer] = (tokens, lane or self._on_loop(args), args)
                    # the call is made as this many ExpertCalls, each with call_timeout
                    waits[peer] = (
                        self.config.call_timeout * -(-sum(counts) // rows_per_call(rows))
                        + self.config.call_slack
                    )
                self._stats.remote_calls += len(calls)
                if local:
                    assert bank is not None
                    tokens, rows, counts, token_of, pair_weights = _request_of(
                        x, local, pairs, k, flat_weights
                    )
                    partial = bank.run_weighted(rows, local, counts, token_of, pair_weights)
                    _add_rows(out, tokens, partial)
                pending = orphans
                waited = time.perf_counter()
                for peer, (tokens, future, args) in calls.items():
                    try:
                        try:
                            partial = future.result(waits[peer])
                        except ExpressFailed:  # no answer on the lane: the same call over QUIC
                            future = self._on_loop(args)
                            calls[peer] = (tokens, future, args)
                            partial = future.result(waits[peer])
                        # a NaN or infinity anywhere makes the sum so (a faulty device or
                        # kernel); one float sum costs ~2 us where isfinite().all() costs 10
                        if not math.isfinite(float(partial.sum())):
                            raise PeerGone(f"{peer.short} answered non-finite sums")
                    except Exception as exc:  # any failure: another holder takes it
                        future.cancel()
                        reason = str(exc) or type(exc).__name__
                        log.warning(
                            "expert call to %s for layer %d failed (%s): trying another holder",
                            peer.short,
                            self.layer,
                            reason,
                        )
                        self._stats.failovers += 1
                        last_error[peer] = reason
                        final = isinstance(exc, RemoteError) and exc.code in _FINAL_REFUSALS
                        (refused if final else failed).add(peer)
                        self._routes.call_failed(peer)
                        pending = sorted(pending + by_peer[peer])
                        continue
                    self._routes.call_answered(peer)
                    _add_rows(out, tokens.to(out.device), partial.to(out.device))
            except BaseException:  # nothing left behind: every call of this round ends here
                for _, future, _ in calls.values():
                    future.cancel()
                raise
            if calls:
                now = time.perf_counter()
                self._stats.wait_seconds += now - waited
                self._stats.step_seconds += now - started
            if pending and not any(self._holders(e, failed | refused) for e in pending):
                holders = [set(self._routes.holders(self.layer, e)) for e in pending]
                if refused and all(h and h <= refused for h in holders):
                    raise ExpertsUnavailable(
                        f"experts {pending} of layer {self.layer} are held only by peers that "
                        f"refuse the call: {_answers(refused, last_error)}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tried = f"; last answers: {_answers(last_error, last_error)}"
                    raise ExpertsUnavailable(
                        f"experts {pending} of layer {self.layer} have no live holder in the "
                        f"mesh (waited {self.config.holder_wait:.0f}s for one)"
                        + (tried if last_error else "")
                    )
                # wait for the routes to change, but look again every half second: a holder
                # that was only suspected for a moment is back without any change to them
                self._routes.wait_change(version, min(remaining, 0.5))
                failed.clear()
        return out

    def _holders(self, expert: int, failed: set[NodeId]) -> list[NodeId]:
        return [h for h in self._routes.holders(self.layer, expert) if h not in failed]

    def _assign(self, experts: list[int], failed: set[NodeId], bank: ExpertBank | None):
        """Experts to run here, experts by peer (as few peers as possible), experts with no
        live holder."""
        local: list[int] = []
        by_peer: dict[NodeId, list[int]] = {}
        orphans: list[int] = []
        remote = []
        for expert in experts:
            if bank is not None and bank.holds(expert):
                local.append(expert)
                continue
            holders = self._holders(expert, failed)
            if holders:
                remote.append((len(holders), expert, holders))
            else:
                orphans.append(expert)
        for _, expert, holders in sorted(remote, key=lambda r: (r[0], r[1])):
            peer = next((h for h in holders if h in by_peer), holders[0])
            by_peer.setdefault(peer, []).append(expert)
        return local, {p: sorted(e) for p, e in by_peer.items()}, orphans


def _answers(peers: Any, last_error: dict[NodeId, str]) -> str:
    """What some peers answered last, for an error message."""
    return "; ".join(f"{peer.short}: {last_error[peer]}" for peer in sorted(peers, key=str))


def _add_rows(out: torch.Tensor, tokens: torch.Tensor, partial: torch.Tensor) -> None:
    """out[tokens] += partial (one token: a plain add)."""
    if out.shape[0] == 1:
        out.add_(partial)
    else:
        out.index_add_(0, tokens, partial)


def _request_of(x, experts, pairs, k, flat_weights):
    """For some experts: the distinct tokens they see (ids, rows), counts per expert, and for
    each (token, expert) pair grouped by expert, its token's position among those rows and
    its gate weight."""
    indices = [i for expert in experts for i in pairs[expert]]
    if x.shape[0] == 1:  # one token (a decode step): each of these experts sees its one row
        zeros = torch.zeros(len(indices), dtype=torch.long, device=x.device)
        first = indices[0]
        if indices == list(range(first, first + len(indices))):  # in order: a view, no gather
            pair_weights = flat_weights[first : first + len(indices)]
        else:
            pair_weights = flat_weights[indices]
        return zeros[:1], x, [1] * len(indices), zeros, pair_weights
    token_ids = sorted({i // k for i in indices})
    position = {t: j for j, t in enumerate(token_ids)}
    tokens = torch.tensor(token_ids, dtype=torch.long, device=x.device)
    rows = x.index_select(0, tokens)
    counts = [len(pairs[expert]) for expert in experts]
    token_of = torch.tensor([position[i // k] for i in indices], dtype=torch.long, device=x.device)
    pair_weights = flat_weights.index_select(0, torch.tensor(indices, device=x.device))
    return tokens, rows, counts, token_of, pair_weights
