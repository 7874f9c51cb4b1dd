"""Independent-shard mode across real nodes in one process: each node serves its own shard of
the built-in model (router restricted to its experts), sessions are hash-routed to shards, and
each shard answers exactly as the same shard loaded alone."""

from __future__ import annotations

from mesh_node.engine import GenerationRequest, Generator
from mesh_node.engine.catalog import BUILTIN_DIR
from mesh_node.engine.loading import LoadPlan
from mesh_node.engine.sampling import SamplingParams
from mesh_node.expert_parallel import independent_shards
from mesh_node.expert_parallel.coordinator import ExpertParallel, ExpertParallelConfig
from mesh_node.identity import NodeIdentity
from mesh_node.membership.messages import Hardware
from mesh_node.placement import rankings as rankings_mod
from mesh_node.placement.shards import shard_for_session
from mesh_node.serving.routing import affinity_key
from mesh_node.transport.errors import ErrorCode, RequestFailed
from tests.gateway.mesh import answer, chat

SHARDS = ExpertParallelConfig(shards=True)


async def test_three_shard_nodes_each_serve_their_shard_and_sessions_stick(
    mesh, tmp_path, monkeypatch
):
    monkeypatch.setenv("MESH_NODE_CACHE", str(tmp_path))
    for _ in range(3):
        await mesh.add(experts=SHARDS)
    await mesh.wait(
        lambda: (
            len(mesh.hosts_of("builtin")) == 3
            and all(n.shards.loaded("builtin") == n.shards.wanted("builtin") for n in mesh.nodes)
            and all(n.shards.loaded("builtin").count == 3 for n in mesh.nodes)
            # every node sees all three serving, or it would hash sessions over fewer shards
            and all(len(n.hosting.status()[0]["ready"]) == 3 for n in mesh.nodes)
        ),
        timeout=90,
    )
    sections = {n.node_id: n.shards.status()[0] for n in mesh.nodes}
    assert sorted(s["shard"] for s in sections.values()) == [0, 1, 2]
    assert len({s["plan"] for s in sections.values()}) == 1  # one split, agreed
    for section in sections.values():
        held = section["experts"]
        assert all(2 <= len(ids) < 8 for ids in held.values())  # core + own, not all 8
    # every node routes a session to the same shard (rendezvous over the shard nodes)
    users = [f"user-{i}" for i in range(6)]
    for user in users:
        request = chat("builtin", "Reverse the words: blue green red", user=user)
        hosts = [str(n.node_id) for n in mesh.nodes]
        chosen = shard_for_session(affinity_key(request).hex(), hosts)
        shard_node = next(n for n in mesh.nodes if str(n.node_id) == chosen)
        experts = {int(k): v for k, v in sections[shard_node.node_id]["experts"].items()}
        with Generator.from_pretrained(
            str(BUILTIN_DIR), plan=LoadPlan(experts=experts, restrict_router=True), device="cpu"
        ) as alone:
            expected = alone.generate(
                GenerationRequest(
                    messages=[{"role": "user", "content": "Reverse the words: blue green red"}],
                    sampling=SamplingParams(max_tokens=32),
                )
            ).text
        for via in mesh.nodes:
            text, _ = await answer(via, request)
            assert text == expected
        served_before = shard_node.local.generators["builtin"].stats().tokens_generated
        assert served_before > 0
    # the user is told what the mode costs (measured on held-out prompts)
    await mesh.wait(
        lambda: all(n.shards.status()[0]["quality"] != "measuring" for n in mesh.nodes),
        timeout=120,
    )
    quality = mesh.nodes[0].shards.status()[0]["quality"]
    assert "3 shards" in quality and "exact-match" in quality


async def test_when_the_leader_leaves_the_next_node_leads_and_the_shards_split_again(
    mesh, tmp_path, monkeypatch
):
    """The first shard node picks the rankings; when it leaves, the next one picks them (it
    never had to: the ones it fetched from the leader, with no analysis of its own), and the
    two left load a split in two."""
    monkeypatch.setenv("MESH_NODE_CACHE", str(tmp_path))
    # no rankings cache on disk: what a node knows, it was told by the mesh or measured
    monkeypatch.setattr(rankings_mod, "load_cached", lambda *args, **kwargs: None)
    monkeypatch.setattr(rankings_mod, "save", lambda *args, **kwargs: None)
    analyses = []
    analyze = rankings_mod.analyze
    monkeypatch.setattr(
        rankings_mod, "analyze", lambda *a, **k: analyses.append(a) or analyze(*a, **k)
    )
    for _ in range(3):
        await mesh.add(experts=SHARDS)

    def split_in(count: int) -> bool:
        return all(
            (loaded := n.shards.loaded("builtin")) is not None
            and loaded == n.shards.wanted("builtin")
            and loaded.count == count
            for n in mesh.nodes
        )

    def measured(count: int) -> bool:  # (a measurement left running would outlive the test)
        return all(f"{count} shards" in n.shards.status()[0]["quality"] for n in mesh.nodes)

    await mesh.wait(lambda: split_in(3) and measured(3), timeout=120)
    leader = next(n for n in mesh.nodes if n.node_id == n.shards.participants("builtin")[0])
    analyses.clear()
    mesh.nodes.remove(leader)
    await leader.stop()
    await mesh.wait(lambda: split_in(2) and measured(2), timeout=120)
    new_leader = min(mesh.nodes, key=lambda n: n.node_id)
    assert new_leader.shards.loaded("builtin").index == 0
    assert not analyses  # the next leader had the rankings from the one before
    assert len({n.shards.loaded("builtin").rankings for n in mesh.nodes}) == 1
    text, _ = await answer(mesh.nodes[1], chat("builtin", "What is 348 + 276?"))
    assert text


async def test_a_shard_node_that_cannot_fetch_published_rankings_gives_up(
    mesh, tmp_path, monkeypatch
):
    """Rankings published but out of reach (here the leader refuses to send them): the other
    node stops waiting after LOAD_WAIT, withdraws the model and says why, and the leader is
    left serving a split of one (the whole model)."""
    monkeypatch.setenv("MESH_NODE_CACHE", str(tmp_path))
    monkeypatch.setattr(independent_shards, "LOAD_WAIT", 1.0)

    def refuse(self, ctx, request):
        raise RequestFailed(ErrorCode.UNAVAILABLE, "not sending rankings today")

    monkeypatch.setattr(ExpertParallel, "_serve_rankings", refuse)
    leader = await mesh.add(experts=SHARDS)
    await mesh.wait(lambda: leader.shards.loaded("builtin") is not None, timeout=60)
    generate = NodeIdentity.generate

    def after_the_leader() -> NodeIdentity:  # so that the node joining does not lead
        while True:
            identity = generate()
            if identity.node_id > leader.node_id:
                return identity

    monkeypatch.setattr(NodeIdentity, "generate", staticmethod(after_the_leader))
    other = await mesh.add(experts=SHARDS)
    await mesh.wait(lambda: "builtin" in other.hosting.failed, timeout=60)
    assert "could not fetch the expert rankings" in other.hosting.failed["builtin"]

    def alone() -> bool:
        loaded = leader.shards.loaded("builtin")
        return (
            loaded is not None and loaded.count == 1 and loaded == leader.shards.wanted("builtin")
        )

    await mesh.wait(alone, timeout=60)
    assert leader.shards.status()[0]["quality"].startswith("one shard")
    # (a measurement of the split in two may still run: it must not outlive the test, and
    # when it ends it must not overwrite what the one shard's status says)
    await mesh.wait(lambda: not leader.shards._measuring, timeout=120)
    assert leader.shards.status()[0]["quality"].startswith("one shard")


async def test_shard_nodes_without_room_for_the_whole_model_do_not_measure_it(
    mesh, tmp_path, monkeypatch
):
    monkeypatch.setenv("MESH_NODE_CACHE", str(tmp_path))
    monkeypatch.setattr(
        independent_shards, "probe_hardware", lambda with_gpus: Hardware(2, 1 << 30, 1 << 10)
    )
    for _ in range(2):
        await mesh.add(experts=SHARDS)
    await mesh.wait(
        lambda: all(
            n.shards.loaded("builtin") is not None
            and n.shards.loaded("builtin").count == 2
            and n.shards.status()[0]["quality"] != "measuring"
            for n in mesh.nodes
        ),
        timeout=90,
    )
    for node in mesh.nodes:
        quality = node.shards.status()[0]["quality"]
        assert quality.startswith("quality not measured: measuring it loads the whole model")
    assert not list(tmp_path.glob("shard-quality/*.json"))  # nothing measured, nothing cached


async def test_a_split_node_in_a_mesh_of_shards_holds_no_experts(mesh, tmp_path, monkeypatch):
    """--moe-shards wins over --moe-split (the shard nodes host the model): a --moe-split node
    joining shard nodes plans no split (it loaded all the experts nobody called, and the shard
    nodes cut their decode threads for its 'expert peers'); one that held a split's experts
    when shard nodes came gives them up."""
    monkeypatch.setenv("MESH_NODE_CACHE", str(tmp_path))
    split = ExpertParallelConfig(enabled=True)
    await mesh.add(experts=split)
    peer = await mesh.add(experts=split)
    await mesh.wait(lambda: peer.experts.service.held("builtin"), timeout=90)
    shard = await mesh.add(experts=SHARDS)
    late = await mesh.add(experts=split)

    def sharded() -> bool:
        return (
            all(len(n.experts.offers_of("builtin")) == 4 for n in mesh.nodes)
            and not any(n.experts.service.held("builtin") for n in mesh.nodes)
            # the split's host has unloaded it: only the shard node serves it, as all see
            and all(n.hosting.status()[0]["ready"] == [str(shard.node_id)] for n in mesh.nodes)
        )

    await mesh.wait(sharded, timeout=90)
    for node in mesh.nodes:
        assert not node.experts.is_split("builtin") and not node.experts.plans
        assert not node.experts.status()
    assert late.experts.service.held("builtin") == {}
    generator = shard.local.generators["builtin"]
    assert generator.decode_threads_override is None  # (no expert peers to share cores with)
    text, _ = await answer(peer, chat("builtin", "What is 348 + 276?"))
    assert text
