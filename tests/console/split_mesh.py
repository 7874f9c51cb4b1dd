"""A 3-node in-process mesh splitting the built-in MoE model, each node with its console on
127.0.0.1:0: real `experts` sections for the console's API and page tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from mesh_node.expert_parallel.coordinator import ExpertParallelConfig
from mesh_node.identity import new_mesh_id
from mesh_node.transport.memory import MemoryNetwork
from tests.gateway.mesh import Mesh

SPLIT = ExpertParallelConfig(enabled=True, memory=6 << 20)  # ~16 of the 32 experts fit each


def settled(mesh: Mesh) -> bool:
    """Every node shows one plan that all follow, and holds all of its part of it."""
    for node in mesh.nodes:
        sections = node.view.status()["experts"]
        if len(sections) != 1 or not sections[0].get("agreed"):
            return False
        plan = sections[0]
        if plan.get("held") != {n["node_id"]: n["bytes"] for n in plan["nodes"] if n["bytes"]}:
            return False
    return len(mesh.hosts_of("builtin")) == 1


@contextlib.asynccontextmanager
async def split_mesh(nodes: int = 3) -> AsyncIterator[Mesh]:
    mesh = Mesh(MemoryNetwork(latency=0.0002), new_mesh_id())
    try:
        for _ in range(nodes):
            await mesh.add(experts=SPLIT, console_port=0)
        await mesh.wait(lambda: settled(mesh), timeout=60)
        yield mesh
    finally:
        await mesh.stop()
