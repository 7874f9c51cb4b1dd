"""The "shards" section of the status document (`IndependentShards.status`), from a loaded
split, against the scripted mesh of test_shard_loading."""

from __future__ import annotations

from mesh_node.expert_parallel.independent_shards import IndependentShards, ShardVariant
from mesh_node.placement.shards import plan_shards
from tests.expert_parallel.test_shard_loading import MODEL, Clock, ScriptedMesh, nodes_in_order


def test_the_section_names_the_split_its_core_and_every_shards_size():
    first, me, third = nodes_in_order(3)
    mesh = ScriptedMesh(me, Clock())
    mesh.offers = {first: "973479b277642ce3", me: "", third: ""}
    mass = {0: [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0], 2: [1.0] * 8}
    plan = plan_shards(mass, 3, top_k=2)  # core: 2 of 8; 6 others dealt 2 per shard
    shards = IndependentShards(mesh, enabled=True)
    shards.plans[MODEL] = (ShardVariant(1, 3, "973479b277642ce3"), plan)

    (section,) = shards.status()
    assert section["model"] == MODEL
    assert (section["shard"], section["shards"]) == (1, 3)
    assert section["nodes"] == [str(first), str(me), str(third)]
    assert (section["rankings"], section["plan"]) == ("973479b277642ce3", plan.fingerprint)
    assert section["num_experts"] == 8
    assert section["core"] == {"0": [0, 1], "2": [0, 1]}
    assert section["experts_per_shard"] == [4, 4, 4]
    for layer, held in section["experts"].items():
        assert set(section["core"][layer]) <= set(held)
        assert len(held) == section["experts_per_shard"][1]
    assert section["quality"] == "measuring"
