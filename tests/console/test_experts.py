"""The `experts` section of /api/status, served by real nodes splitting the built-in MoE
model (in-process mesh, real engine): the shape documented in proto/CONSOLE.md."""

from __future__ import annotations

import math

from tests.console.split_mesh import split_mesh
from tests.gateway.mesh import answer, chat


async def test_status_carries_the_expert_plan_of_a_split_model(http):
    async with split_mesh() as mesh:
        host = mesh.hosts_of("builtin")[0]
        await answer(host, chat("builtin", "What is 2 + 2?", max_tokens=4))
        ids = {str(n.node_id) for n in mesh.nodes}
        fingerprint = host.experts.plans["builtin"].plan.fingerprint
        for node in mesh.nodes:
            async with http.get(f"{node.console.url}/api/status") as response:
                assert response.status == 200
                experts = (await response.json())["experts"]
            assert len(experts) == 1
            plan = experts[0]
            assert plan["model"] == "builtin" and plan["error"] is None
            assert plan["fingerprint"] == fingerprint and plan["agreed"] is True
            assert plan["host"] == str(host.node_id)
            assert plan["following"] == {i: fingerprint for i in ids}
            assert isinstance(plan["rankings"], str) and plan["rankings"]
            assert plan["layers"] == [0, 1, 2, 3] and plan["num_experts"] == 8
            assert {n["node_id"] for n in plan["nodes"]} == ids
            assert plan["nodes"][0]["host"] is True  # the host comes first
            per_layer: dict[str, set[int]] = {}
            for n in plan["nodes"]:
                assert n["short"] == n["node_id"][:10]
                assert n["count"] == sum(len(e) for e in n["experts"].values()) > 0
                assert n["bytes"] == n["count"] * plan["expert_bytes"] <= n["budget"]
                assert plan["held"][n["node_id"]] == n["bytes"]
                for layer, held in n["experts"].items():
                    per_layer.setdefault(layer, set()).update(held)
            assert per_layer == {str(layer): set(range(8)) for layer in range(4)}
            assert plan["total_bytes"] == sum(n["bytes"] for n in plan["nodes"])
            assert math.isclose(sum(n["bytes_share"] for n in plan["nodes"]), 1.0)
            assert math.isclose(sum(n["budget_share"] for n in plan["nodes"]), 1.0)
            for replica in plan["replicas"]:
                assert len(set(replica["holders"])) == len(replica["holders"]) >= 2
                assert set(replica["holders"]) <= ids
            assert all(len(pair) == 2 for pair in plan["unreplicated"])
            if node is host:  # the host dispatches, and counts
                assert plan["dispatch"]["steps"] > 0
                assert plan["dispatch"]["remote_calls"] > 0
                assert plan["dispatch"]["failovers"] == 0
            elif "dispatch" in plan:  # a node that ran the model earlier (an early election)
                assert set(plan["dispatch"]) == {"steps", "remote_calls", "failovers"}
