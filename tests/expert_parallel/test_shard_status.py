"""The "shards" section of the status document (`IndependentShards.status`), from a loaded
split, against the scripted mesh of test_shard_loading."""

from __future__ import annotations

import asyncio
import json
import threading

from mesh_node.engine.evaluation import PromptScore, QualityReport
from mesh_node.engine.loading import LoadPlan
from mesh_node.expert_parallel import independent_shards
from mesh_node.expert_parallel.coordinator import UNIFORM
from mesh_node.expert_parallel.independent_shards import IndependentShards, ShardVariant
from mesh_node.placement import shard_quality
from mesh_node.placement.shards import plan_shards
from mesh_node.serving.hosting import HostingConfig
from tests.expert_parallel.test_shard_loading import (
    BUILTIN,
    MODEL,
    Clock,
    ScriptedMesh,
    nodes_in_order,
)
from tests.placement.test_shard_quality import fake_quality


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


async def test_once_the_shards_split_again_the_old_splits_quality_is_not_shown(monkeypatch):
    """Three shard nodes, then two: while the two-way split's cost is being measured, the
    status says so, rather than the three-way split's figure beside the two-way split."""
    first, me, third = nodes_in_order(3)
    mesh = ScriptedMesh(me, Clock())
    mesh.offers = {first: UNIFORM, me: UNIFORM, third: UNIFORM}
    tasks: list[asyncio.Task] = []
    mesh.spawn = lambda coro: tasks.append(asyncio.ensure_future(coro))
    mesh.kick = lambda: None
    two_way_measured = threading.Event()

    def summary(path, count, **kwargs):
        if count == 2:
            assert two_way_measured.wait(30)
        return fake_quality(count)

    monkeypatch.setattr(independent_shards, "shard_quality_summary", summary)
    shards = IndependentShards(mesh, enabled=True)
    config = HostingConfig(device="cpu", max_seq_len=64)
    (await shards.load(BUILTIN, config)).close()
    async with asyncio.timeout(30):
        await tasks[0]
    assert shards.status()[0]["quality"].startswith("independent-shard mode: 3 shards")
    del mesh.offers[third]
    (await shards.load(BUILTIN, config)).close()
    try:
        (section,) = shards.status()
        assert section["shards"] == 2
        assert section["quality"] == "measuring"
    finally:
        two_way_measured.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks)
    assert shards.status()[0]["quality"].startswith("independent-shard mode: 2 shards")


async def test_the_quality_shown_is_that_of_the_split_loaded(monkeypatch, tmp_path):
    """A shard node splits by the leader's rankings (here none: every expert alike); the
    figure it shows must be measured on that split, not on one planned from other usage
    figures (the measurement's own calibration prompts rank the experts otherwise)."""
    monkeypatch.setenv("MESH_NODE_CACHE", str(tmp_path))
    scored: list[LoadPlan | None] = []

    def evaluate(path, plan=None, examples=(), **kwargs):  # (the scores do not matter here)
        scored.append(plan)
        return QualityReport(tuple(examples), tuple(PromptScore(True, 0.1, 1) for _ in examples), 0)

    monkeypatch.setattr(shard_quality, "evaluate_quality", evaluate)
    first, me = nodes_in_order(2)
    mesh = ScriptedMesh(me, Clock())
    mesh.offers = {first: UNIFORM, me: UNIFORM}
    tasks: list[asyncio.Task] = []
    mesh.spawn = lambda coro: tasks.append(asyncio.ensure_future(coro))
    mesh.kick = lambda: None
    shards = IndependentShards(mesh, enabled=True)
    (await shards.load(BUILTIN, HostingConfig(device="cpu", max_seq_len=64))).close()
    async with asyncio.timeout(60):
        await asyncio.gather(*tasks)
    (section,) = shards.status()
    assert section["quality"].startswith("independent-shard mode: 2 shards")
    (entry,) = (tmp_path / "shard-quality").glob("*.json")
    assert json.loads(entry.read_text())["plan_fingerprint"] == section["plan"]
    held = {int(layer): tuple(ids) for layer, ids in section["experts"].items()}
    assert held in [plan.experts for plan in scored if plan is not None]
