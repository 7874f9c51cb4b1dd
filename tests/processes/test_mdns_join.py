"""A node that joins through mDNS learns what the mesh hosts before its first election."""

from __future__ import annotations

import asyncio

from mesh_node.identity import new_mesh_id
from tests.processes.nodes import NodeProcess, stop_all


async def test_a_node_joining_through_mdns_does_not_load_a_model_the_mesh_already_hosts():
    """Like a --peer joiner, a node that finds the mesh by mDNS learns that the mesh already
    hosts builtin and does not load it (soak review: hosting's first election waited only for
    joins through --peer seeds, and mDNS started after it, so such a joiner elected itself as
    if alone, loaded every model it offers, and could take a model over from its host)."""
    mesh_id = new_mesh_id()
    nodes: list[NodeProcess] = []
    try:
        first = await NodeProcess.join(mesh_id, "--mdns-interface", "127.0.0.1")
        nodes.append(first)
        await first.wait_log(r"hosting builtin \(loaded", timeout=30)
        joiner = await NodeProcess.join(mesh_id, "--mdns-interface", "127.0.0.1")
        nodes.append(joiner)
        await joiner.wait_log(rf"node {first.node_id.short} is alive", timeout=20)
        await asyncio.sleep(3)  # (its first election comes within join_settle, 3 s, of its start)
        elected = [line for line in joiner.stderr_lines if "elected to host builtin" in line]
        assert not elected, f"the joiner loaded builtin as if alone: {elected}"
    finally:
        await stop_all(nodes)
