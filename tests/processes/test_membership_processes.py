"""Three nodes as OS processes on loopback: discovery through mDNS bound to 127.0.0.1, and
separately through --peer; kill -9 detected within the bound; SIGTERM leaves at once."""

from __future__ import annotations

import asyncio
import signal
import time

from mesh_node.identity import new_mesh_id
from tests.processes.nodes import NodeProcess, start_mesh, stop_all

DETECTION_BOUND = 5.0  # seconds: a killed node is dead to everyone within this


async def sees(node: NodeProcess, other: NodeProcess, timeout: float = 20.0) -> None:
    await node.wait_log(rf"node {other.node_id.short} is alive", timeout=timeout)


async def all_see_all(nodes: list[NodeProcess]) -> None:
    await asyncio.gather(*(sees(a, b) for a in nodes for b in nodes if a is not b))


async def test_three_processes_find_each_other_with_mdns_on_loopback():
    mesh_id = new_mesh_id()
    nodes: list[NodeProcess] = []
    try:
        for _ in range(3):  # (inside the try: the ones started are stopped whatever happens)
            nodes.append(await NodeProcess.join(mesh_id, "--mdns-interface", "127.0.0.1"))
        await all_see_all(nodes)  # with no --peer at all: only mDNS can have done this
        found = [any("discovered node" in line for line in n.stderr_lines) for n in nodes]
        assert any(found)  # (a node found by the others first needs to discover no one)
        # a node of another mesh on the same LAN is not joined
        stranger = await NodeProcess.join(new_mesh_id(), "--mdns-interface", "127.0.0.1")
        try:
            await asyncio.sleep(3)
            for node in nodes:
                assert not any(stranger.node_id.short in line for line in node.stderr_lines)
        finally:
            await stranger.stop()
    finally:
        await stop_all(nodes)


async def test_three_processes_join_through_peers_and_detect_a_kill():
    mesh_id = new_mesh_id()
    nodes = await start_mesh(mesh_id, 3)
    first, others = nodes[0], nodes[1:]
    try:
        await all_see_all(nodes)
        victim, survivors = others[1], [first, others[0]]
        killed_at = time.monotonic()
        await victim.kill()
        await asyncio.gather(
            *(s.wait_log(rf"node {victim.node_id.short} is dead", timeout=15) for s in survivors)
        )
        took = time.monotonic() - killed_at
        assert took < DETECTION_BOUND, f"kill -9 detected after {took:.1f}s"
    finally:
        await stop_all(nodes)


async def test_sigterm_leaves_at_once():
    mesh_id = new_mesh_id()
    nodes = await start_mesh(mesh_id, 3)
    first, others = nodes[0], nodes[1:]
    try:
        await all_see_all(nodes)
        leaver = others[0]
        started = time.monotonic()
        leaver.proc.send_signal(signal.SIGTERM)
        left = rf"node {leaver.node_id.short} has left"
        await asyncio.gather(*(n.wait_log(left, timeout=5) for n in (first, others[1])))
        assert time.monotonic() - started < 1.0  # the others know at once
        async with asyncio.timeout(5):
            assert await leaver.proc.wait() == 0  # and it exits cleanly
        assert time.monotonic() - started < 3.0
    finally:
        await stop_all(nodes)
