"""The host side of expert parallelism: an `ExpertComputer` that runs a MoE layer's experts
wherever they are held.

The engine's MoE layer routes and combines; for the expert computation it calls
`run_grouped(rows, experts, counts)` on its worker thread. `RemoteExperts` splits the groups:
experts this node holds run here, the others go to the peers holding them, ONE call per peer
per layer (an expert held by several peers goes to a peer that is already being called when
it can). The calls are started on the event loop first, then the local experts run while they
are in flight, then the answers are put back in row order. The combine with the gate weights
stays in the MoE layer, exactly as on a single node, so the result is the same math.

A peer that fails (timeout, connection lost, gone from the mesh, refusal) is dropped for the
rest of the step and its groups go to another holder (a replica) at once. When no live node
holds an expert, the step waits for the routes to change (the plan is recomputed and some
peer loads it) up to `holder_wait` seconds, then fails with `ExpertsUnavailable`: the request
gets a clear error, never a silently wrong answer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mesh_node.engine.errors import EngineError
from mesh_node.engine.experts import ExpertBank
from mesh_node.identity import NodeId

log = logging.getLogger("mesh_node.experts")


class ExpertsUnavailable(EngineError):
    """Some expert of a layer has no live holder (and none appeared in time)."""


@dataclass(frozen=True)
class DispatchConfig:
    call_timeout: float = 30.0  # one remote call, compute included
    holder_wait: float = 60.0  # how long a step waits for a missing expert to get a holder


class ExpertRoutes:
    """Who holds which expert of one model, as the engine thread reads it: a snapshot that the
    event loop replaces whole (`update`), with a condition the engine can wait on."""

    def __init__(self) -> None:
        self._holders: dict[tuple[int, int], tuple[NodeId, ...]] = {}
        self._version = 0
        self._cond = threading.Condition()

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
        """Remote nodes holding the expert, best first (alive before suspect, plan order)."""
        return self._holders.get((layer, expert), ())

    def wait_change(self, version: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._version != version, timeout)


# (peer, layer, experts, counts, rows) -> outputs; a coroutine run on the node's event loop
PeerCall = Callable[[NodeId, int, list[int], list[int], torch.Tensor], Awaitable[torch.Tensor]]


@dataclass
class DispatchStats:
    steps: int = 0
    remote_calls: int = 0
    failovers: int = 0
    wait_seconds: float = 0.0  # time the engine waited for remote answers after its own work
    step_seconds: float = 0.0  # time in run_grouped with remote calls, all of it


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
    ):
        super().__init__()
        self.layer = layer
        self._local = local
        self._routes = routes
        self._call = call
        self._loop = loop
        self._stats = stats
        self.config = config or DispatchConfig()

    def run_grouped(
        self, rows: torch.Tensor, experts: Sequence[int], counts: Sequence[int]
    ) -> torch.Tensor:
        out = torch.empty_like(rows)
        groups: list[tuple[int, int, int]] = []  # (expert, first row, count)
        start = 0
        for expert, count in zip(experts, counts, strict=True):
            if count:
                groups.append((int(expert), start, int(count)))
            start += count
        self._stats.steps += 1
        started = time.perf_counter()
        failed: set[NodeId] = set()
        deadline = time.monotonic() + self.config.holder_wait
        while groups:
            version = self._routes.version
            local, by_peer, orphans = self._assign(groups, failed)
            calls = {
                peer: asyncio.run_coroutine_threadsafe(
                    self._call(
                        peer,
                        self.layer,
                        [g[0] for g in assigned],
                        [g[2] for g in assigned],
                        _gather_rows(rows, assigned),
                    ),
                    self._loop,
                )
                for peer, assigned in by_peer.items()
            }
            self._stats.remote_calls += len(calls)
            if local:
                bank = self._local()
                assert bank is not None
                outputs = bank.run_grouped(
                    _gather_rows(rows, local), [g[0] for g in local], [g[2] for g in local]
                )
                _scatter(out, local, outputs)
            groups = orphans
            waited = time.perf_counter()
            for peer, future in calls.items():
                try:
                    outputs = future.result(self.config.call_timeout + 5.0)
                except Exception as exc:  # any failure: another holder takes it
                    future.cancel()
                    log.warning(
                        "expert call to %s for layer %d failed (%s): trying another holder",
                        peer.short,
                        self.layer,
                        exc or type(exc).__name__,
                    )
                    self._stats.failovers += 1
                    failed.add(peer)
                    groups = groups + by_peer[peer]
                    continue
                _scatter(out, by_peer[peer], outputs.to(out.device))
            if calls:
                now = time.perf_counter()
                self._stats.wait_seconds += now - waited
                self._stats.step_seconds += now - started
            if groups and not any(self._holders(g[0], failed) for g in groups):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._routes.wait_change(version, remaining):
                    missing = sorted({g[0] for g in groups})
                    raise ExpertsUnavailable(
                        f"experts {missing} of layer {self.layer} have no live holder in the "
                        f"mesh (waited {self.config.holder_wait:.0f}s for one)"
                    )
                failed.clear()  # routes changed: a recovered or new holder may be there
        return out

    def _holders(self, expert: int, failed: set[NodeId]) -> list[NodeId]:
        return [h for h in self._routes.holders(self.layer, expert) if h not in failed]

    def _assign(self, groups, failed):
        """Local groups, groups by peer (as few peers as possible), and groups with no holder."""
        bank = self._local()
        local, by_peer, orphans = [], {}, []
        remote = []
        for group in groups:
            if bank is not None and bank.holds(group[0]):
                local.append(group)
            else:
                holders = self._holders(group[0], failed)
                if holders:
                    remote.append((len(holders), group, holders))
                else:
                    orphans.append(group)
        for _, group, holders in sorted(remote, key=lambda r: (r[0], r[1][1])):
            peer = next((h for h in holders if h in by_peer), holders[0])
            by_peer.setdefault(peer, []).append(group)
        return local, by_peer, orphans


def _gather_rows(rows: torch.Tensor, groups: list[tuple[int, int, int]]) -> torch.Tensor:
    if len(groups) == 1:
        _, start, count = groups[0]
        return rows[start : start + count]
    return torch.cat([rows[start : start + count] for _, start, count in groups])


def _scatter(out: torch.Tensor, groups: list[tuple[int, int, int]], outputs: torch.Tensor):
    at = 0
    for _, start, count in groups:
        out[start : start + count] = outputs[at : at + count]
        at += count
