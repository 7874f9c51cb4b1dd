"""Build meshes of real Membership services over the in-memory network (tests, benchmarks).
Run them on the virtual-time loop: timers jump, so simulated minutes take CPU seconds."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from mesh_node.identity import MeshSecret, NodeIdentity
from mesh_node.membership.claims import ALIVE
from mesh_node.membership.messages import Address, Hardware
from mesh_node.membership.state import SelfState
from mesh_node.membership.swim import Membership, MembershipConfig
from mesh_node.protocol import REGISTRY
from mesh_node.transport.connection import Handlers
from mesh_node.transport.memory import MemoryNetwork

BOOT_MS = 1_700_000_000_000


@dataclass
class SimNode:
    identity: NodeIdentity
    endpoint: object
    membership: Membership

    @property
    def node_id(self):
        return self.identity.node_id

    @property
    def address(self):
        return self.endpoint.address

    def alive_ids(self):
        return {m.node_id for m in self.membership.table if m.status == ALIVE}

    def status_of(self, other: SimNode) -> str | None:
        member = self.membership.table.get(other.node_id)
        return member.status if member else None


class CutLinkNetwork(MemoryNetwork):
    """An in-memory network that can cut single links: A-C down while A-B and B-C work
    (`partition` puts nodes in groups, so it cannot express this)."""

    def __init__(self, latency: float):
        super().__init__(latency)
        self._cut: set[frozenset] = set()

    def cut(self, a: SimNode, b: SimNode) -> None:
        self._cut.add(frozenset((a.address, b.address)))
        self._paths_changed()

    def restore(self, a: SimNode, b: SimNode) -> None:
        self._cut.discard(frozenset((a.address, b.address)))
        self._paths_changed()

    def partitioned(self, a, b) -> bool:
        return frozenset((a, b)) in self._cut or super().partitioned(a, b)


class SimMesh:
    def __init__(self, network: MemoryNetwork, mesh: MeshSecret, config: MembershipConfig, seed=0):
        self.network = network
        self.mesh = mesh
        self.config = config
        self.rng = random.Random(seed)
        self.nodes: list[SimNode] = []
        self.boots = 0
        self.changed = asyncio.Event()  # set on any change in any node's table

    async def add(
        self, seeds=None, identity=None, address=None, start=True, unreachable=()
    ) -> SimNode:
        """A node (a new one, or `identity` restarted) joining through `seeds` (default: the
        first node). `unreachable`: addresses it advertises ahead of its own that nobody can
        reach (an interface of its machine that others have no route to)."""
        identity = identity or NodeIdentity.generate()
        endpoint = self.network.endpoint(
            identity, self.mesh, registry=REGISTRY, handlers=Handlers(), address=address
        )
        await endpoint.start()
        self.boots += 1
        # a restarted node starts at a later time: a higher incarnation than before
        boot = BOOT_MS + int(asyncio.get_running_loop().time() * 1000) + self.boots
        state = SelfState(
            identity.node_id.key,
            start_version=boot,
            name=f"n{len(self.nodes)}",
            software="mesh-node/test",
            role="worker",
            addresses=[*unreachable, Address(*endpoint.address)],
            hardware=Hardware(cpu_cores=2, ram_total=8 << 30, ram_free=4 << 30),
        )
        if seeds is None:
            seeds = [self.nodes[0].address] if self.nodes else []
        membership = Membership(
            endpoint,
            state,
            config=self.config,
            seeds=seeds,
            rng=random.Random(self.rng.random()),
        )
        membership.table.subscribe(lambda member, what: self.changed.set())
        if start:
            await membership.start()
        node = SimNode(identity, endpoint, membership)
        self.nodes.append(node)
        return node

    async def add_converged(self, count: int) -> None:
        """Add `count` nodes that already know each other (as if they had all joined long
        ago), then start them. Builds a large converged mesh without simulating N joins."""
        new = [await self.add(seeds=[], start=False) for _ in range(count)]
        claims = [n.membership.table.get(n.node_id).alive_claim for n in new]
        states = [n.membership.self_state.current for n in new]
        for node in new:
            table = node.membership.table
            for claim, state in zip(claims, states, strict=True):
                table.apply(claim)
                table.apply_state(state)
        for node in new:
            await node.membership.start()

    def crash(self, node: SimNode) -> None:
        self.network.crash(node.address)
        for task in [*node.membership._tasks, *node.membership._background]:
            task.cancel()
        node.membership._running = False
        self.nodes.remove(node)

    async def leave(self, node: SimNode) -> None:
        await node.membership.leave()
        await node.endpoint.close()
        self.nodes.remove(node)

    async def stop(self) -> None:
        for node in list(self.nodes):
            await node.membership.stop()
            await node.endpoint.close()

    def converged(self) -> bool:
        """Every running node sees exactly the running nodes alive, with their states."""
        ids = {n.node_id for n in self.nodes}
        for node in self.nodes:
            if node.alive_ids() != ids:
                return False
            for other in self.nodes:
                member = node.membership.table.get(other.node_id)
                if (
                    member.state is None
                    or member.state.version != other.membership.self_state.current.version
                ):
                    return False
        return True

    async def wait_for(self, predicate, timeout: float) -> float:
        """Wait (in loop time) until predicate() holds, re-checking on every table change;
        returns how long it took."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
        return loop.time() - start
