"""The membership view is the console's real StatusSource: its documents follow
proto/CONSOLE.md (same checker as the console client) and it streams changes."""

from __future__ import annotations

import asyncio

from mesh_node.console.client import status_document_problem
from mesh_node.identity import MeshSecret, new_mesh_id
from mesh_node.membership.claims import DEAD
from mesh_node.membership.messages import ExpertShard, Load, ModelInfo
from mesh_node.membership.swim import MembershipConfig
from mesh_node.membership.view import SUBSCRIBER_QUEUE, MeshView
from mesh_node.transport import virtual_time
from mesh_node.transport.memory import MemoryNetwork
from tests.console.scripted_source import make_peer
from tests.membership.mesh import SimMesh


def run_mesh(check, nodes=3):
    async def main():
        mesh = SimMesh(MemoryNetwork(latency=0.0005), MeshSecret(new_mesh_id()), MembershipConfig())
        for _ in range(nodes):
            await mesh.add()
        try:
            await mesh.wait_for(mesh.converged, 10)
            await check(mesh)
        finally:
            await mesh.stop()

    virtual_time.run(main())


def test_documents_follow_the_console_spec():
    async def check(mesh):
        node = mesh.nodes[0]
        node.membership.update_state(
            models_on_disk=[ModelInfo("tiny-moe", "qwen3_moe", 100, 10, 8)],
            models_served=["tiny-moe"],
        )
        await mesh.wait_for(mesh.converged, 5)
        view = MeshView(mesh.nodes[1].membership.table)
        doc = view.status()
        assert status_document_problem(doc) is None
        assert set(doc["peers"][0]) == set(make_peer(0))  # exactly the specified fields
        assert doc["mesh"] == {"nodes": 3, "alive": 3, "suspect": 0, "dead": 0, "left": 0}
        assert doc["peers"][0]["self"] and doc["node"] == doc["peers"][0]["id"]
        assert doc["models"] == [
            {"name": "tiny-moe", "served_by": [str(node.node_id)], "on_disk": [str(node.node_id)]}
        ]
        for peer in doc["peers"]:
            assert peer["hardware"]["cpu_cores"] == 2 and peer["status"] == "alive"
            assert peer["self"] or peer["rtt_ms"] is not None

    run_mesh(check)


def test_a_dead_member_no_longer_shows_as_serving_holding_or_loaded():
    """What it announced while alive stays (its name, hardware, files, role); what it was
    doing is over, and the document says so (before, a dead host still served its model)."""

    async def check(mesh):
        host = mesh.nodes[2]
        host.membership.update_state(
            role="host",
            models_on_disk=[ModelInfo("tiny-moe", "qwen3_moe", 100, 10, 8)],
            models_served=["tiny-moe"],
            expert_shards=[ExpertShard("tiny-moe", 0, [1, 2])],
            load=Load(inflight=3, tokens_per_s=12.5),
        )
        await mesh.wait_for(mesh.converged, 5)
        view = MeshView(mesh.nodes[0].membership.table)
        (alive,) = [p for p in view.status()["peers"] if p["id"] == str(host.node_id)]
        assert alive["models_served"] == ["tiny-moe"] and alive["load"]["inflight"] == 3
        mesh.crash(host)
        await mesh.wait_for(lambda: mesh.nodes[0].status_of(host) == DEAD, 30)
        doc = view.status()
        (dead,) = [p for p in doc["peers"] if p["id"] == str(host.node_id)]
        assert dead["status"] == DEAD and dead["role"] == "host"
        assert dead["models_on_disk"] == alive["models_on_disk"]
        assert dead["models_served"] == [] and dead["expert_shards"] == []
        assert dead["load"] == {"inflight": 0, "tokens_per_s": 0.0}
        assert doc["models"] == []  # (neither served nor on the disk of a live node)
        assert status_document_problem(doc) is None

    run_mesh(check)


def test_changes_are_streamed_and_a_slow_reader_resyncs():
    async def check(mesh):
        view = MeshView(mesh.nodes[0].membership.table)
        sub = view.subscribe()
        victim = mesh.nodes[2]
        mesh.crash(victim)
        events = []

        async def read():
            async for event, payload in sub:
                events.append((event, payload))
                if payload.get("id") == str(victim.node_id) and payload["status"] == DEAD:
                    return

        async with asyncio.timeout(20):
            await read()
        assert events[-1][1]["status"] == DEAD
        assert status_document_problem(view.status()) is None
        # a reader that never reads: its backlog collapses into one resync, whose document is
        # built when the reader comes back (once), not on overflow: a stalled reader costs
        # nothing however many changes come
        lazy = view.subscribe()
        built = []
        status = view.status
        view.status = lambda: built.append(1) or status()
        for _ in range(3 * SUBSCRIBER_QUEUE):
            view._publish("peer", events[-1][1])
        assert built == [] and lazy._queue.qsize() == 1
        first = await anext(aiter(lazy))
        assert first[0] == "status" and status_document_problem(first[1]) is None
        assert built == [1] and lazy._queue.qsize() == 0
        view._publish("peer", events[-1][1])  # after the resync, changes queue again
        assert await anext(aiter(lazy)) == ("peer", events[-1][1])
        del view.status
        lazy.close()
        sub.close()
        assert view._subscribers == set()

    run_mesh(check)
