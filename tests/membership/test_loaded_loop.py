"""No false deaths when the event loop is loaded: three nodes over real QUIC share one loop
that a CPU hog blocks for 200 ms out of every 250 ms, for 12 seconds."""

from __future__ import annotations

import asyncio
import random
import time

from mesh_node.identity import NodeIdentity
from mesh_node.membership.claims import ALIVE, DEAD
from mesh_node.membership.messages import Address
from mesh_node.membership.state import SelfState
from mesh_node.membership.swim import Membership, MembershipConfig
from mesh_node.protocol import REGISTRY
from mesh_node.transport.connection import Handlers
from mesh_node.transport.quic import QuicEndpoint


async def hog(stop: asyncio.Event, busy: float = 0.2, idle: float = 0.05) -> int:
    """Block the loop for `busy` seconds, let it breathe for `idle`, until stopped."""
    rounds = 0
    while not stop.is_set():
        time.sleep(busy)  # noqa: ASYNC251 (deliberately blocking: this is the load)
        rounds += 1
        await asyncio.sleep(idle)
    return rounds


async def test_no_false_deaths_under_a_loaded_event_loop(mesh):
    services, endpoints = [], []
    try:
        for i in range(3):
            identity = NodeIdentity.generate()
            endpoint = QuicEndpoint(
                identity, mesh, registry=REGISTRY, handlers=Handlers(), host="127.0.0.1", port=0
            )
            await endpoint.start()
            endpoints.append(endpoint)
            state = SelfState(
                identity.node_id.key,
                start_version=int(time.time() * 1000),
                name=f"n{i}",
                software="test",
                role="worker",
                addresses=[Address("127.0.0.1", endpoint.port)],
            )
            seeds = [("127.0.0.1", endpoints[0].port)] if i else []
            membership = Membership(
                endpoint, state, config=MembershipConfig(), seeds=seeds, rng=random.Random(i)
            )
            await membership.start()
            services.append(membership)

        def converged() -> bool:
            return all(len([m for m in s.table if m.status == ALIVE]) == 3 for s in services)

        changed = asyncio.Event()
        for s in services:
            s.table.subscribe(lambda m, what: changed.set())
        async with asyncio.timeout(10):
            while not converged():
                changed.clear()
                await changed.wait()
        deaths = []
        for s in services:
            s.table.subscribe(lambda m, what: deaths.append(m) if m.status == DEAD else None)
        stop = asyncio.Event()
        load = asyncio.create_task(hog(stop))
        await asyncio.sleep(12)
        stop.set()
        assert await load > 40  # the loop really was stalled most of the time
        assert deaths == []
        assert all(len([m for m in s.table if m.status == ALIVE]) == 3 for s in services)
        assert max(s.health for s in services) > 0  # they noticed and slowed down
    finally:
        for s in services:
            await s.stop()
        for e in endpoints:
            await e.close()
