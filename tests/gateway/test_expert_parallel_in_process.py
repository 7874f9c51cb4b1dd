"""Expert parallelism across real nodes in one process (in-memory network, real engine): the
built-in model split three ways answers exactly as one node holding everything."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from unittest import mock

import pytest
import torch

from mesh_node.engine import GenerationRequest, Generator
from mesh_node.engine.catalog import BUILTIN_DIR
from mesh_node.engine.loading import LoadPlan, load_expert_banks, load_model
from mesh_node.engine.sampling import SamplingParams
from mesh_node.expert_parallel import coordinator
from mesh_node.expert_parallel.coordinator import ExpertParallelConfig
from mesh_node.expert_parallel.dispatch import (
    DispatchConfig,
    DispatchStats,
    ExpertRoutes,
    ExpertsUnavailable,
    RemoteExperts,
)
from mesh_node.placement import rankings as rankings_mod
from tests.engine.conftest import DEVICES
from tests.gateway.mesh import answer, chat

SPLIT = ExpertParallelConfig(enabled=True, memory=6 << 20)  # ~16 of the 32 experts fit each
PROMPTS = ["What is 348 + 276?", "Reverse the words: blue green red", "Sort the letters: d b a c"]


@pytest.fixture(scope="module")
def single_node_answers():
    with Generator.from_pretrained(None, device="cpu") as generator:
        return [
            generator.generate(
                GenerationRequest(
                    messages=[{"role": "user", "content": p}],
                    sampling=SamplingParams(max_tokens=32),
                )
            ).text
            for p in PROMPTS
        ]


async def test_three_nodes_split_the_experts_and_answer_like_one(mesh, single_node_answers):
    for _ in range(3):
        await mesh.add(experts=SPLIT)
    await mesh.wait(lambda: len(mesh.hosts_of("builtin")) == 1, timeout=60)
    host = mesh.hosts_of("builtin")[0]
    # a node loads its part of a new plan after computing it (and drops what an earlier plan,
    # made before the third node joined, gave it): wait until all follow one plan and hold it
    await mesh.wait(lambda: holding_one_plan(mesh.nodes, "builtin"), timeout=60)
    # each node holds a share of the experts; together they hold all 4 x 8, the hottest twice
    held = {n.node_id: n.expert_service.held("builtin") for n in mesh.nodes}
    assert all(0 < sum(len(e) for e in h.values()) < 32 for h in held.values())
    for layer in range(4):
        together = set().union(*(set(h.get(layer, ())) for h in held.values()))
        assert together == set(range(8))
    # every node computes the same plan, and each holds exactly its part of it
    fingerprints = {n.experts.plans["builtin"].plan.fingerprint for n in mesh.nodes}
    assert len(fingerprints) == 1
    for node in mesh.nodes:
        plan = node.experts.plans["builtin"].plan
        assert node.expert_service.nbytes("builtin") == plan.bytes_of(node.node_id)
        assert replicas_are_distinct(plan)
    # answers through every node equal the single-node engine's
    for node in mesh.nodes:
        for prompt, expected in zip(PROMPTS, single_node_answers, strict=True):
            text, _ = await answer(node, chat("builtin", prompt))
            assert text == expected
    stats = host.experts.stats["builtin"]
    assert stats.remote_calls > 0 and stats.failovers == 0
    # the plan each node follows is gossiped: every node sees that all agree
    await mesh.wait(lambda: all(n.experts.status()[0].get("agreed") for n in mesh.nodes))
    status = mesh.nodes[1].view.status()["experts"][0]
    assert status["model"] == "builtin" and status["fingerprint"] in fingerprints
    assert set(status["following"].values()) == fingerprints


async def test_nodes_on_separate_machines_spread_every_layer(mesh, single_node_answers):
    """Nodes gossip the machine they run on: three machines hold a share of every layer (they
    read their experts at once); one machine holds whole layers per node (see the test above,
    whose nodes all gossip this kernel's label)."""
    for machine in ("box-a", "box-b", "box-c"):
        await mesh.add(experts=SPLIT, machine=machine)
    await mesh.wait(lambda: len(mesh.hosts_of("builtin")) == 1, timeout=60)
    host = mesh.hosts_of("builtin")[0]
    plan = host.experts.plans["builtin"].plan
    for node in mesh.nodes:
        assert all(0 < len(plan.experts_of(node.node_id)[layer]) < 8 for layer in range(4))
    text, _ = await answer(mesh.nodes[2], chat("builtin", PROMPTS[0]))
    assert text == single_node_answers[0]
    same = mesh.nodes[0].experts
    same_plan = same.plans["builtin"].plan
    assert {o.machine for o in same.plans["builtin"].inputs[1]} == {"box-a", "box-b", "box-c"}
    assert same_plan.fingerprint == plan.fingerprint


async def test_a_node_planning_afresh_agrees_with_nodes_that_planned_before(mesh):
    """The plan is a function of the gossip as it is now, not of what a node saw before: after
    a participant's budget moves a little (as when it comes back at once from a restart with
    a little more free memory), a node that computes the plan for the first time follows the
    same plan as the nodes that computed theirs earlier."""
    for _ in range(3):
        await mesh.add(experts=SPLIT)
    await mesh.wait(lambda: holding_one_plan(mesh.nodes, "builtin"), timeout=60)
    before = mesh.nodes[0].experts.plans["builtin"].plan
    moved = mesh.nodes[2]
    moved.experts._publish_model("builtin", expert_budget=SPLIT.memory * 6 // 5)  # +20%
    late = await mesh.add(experts=ExpertParallelConfig(enabled=False))  # plans, holds nothing
    await mesh.wait(lambda: holding_one_plan(mesh.nodes, "builtin"), timeout=60)
    plan = late.experts.plans["builtin"].plan
    assert plan.budgets[moved.node_id] > before.budgets[moved.node_id]  # planned on the new offer


async def test_offers_that_admit_no_plan_are_reported_until_they_do_again(mesh):
    """When the offers cannot hold every expert, each node says so and keeps following its
    last plan; when they come back, the report goes."""
    for _ in range(3):
        await mesh.add(experts=SPLIT)
    await mesh.wait(lambda: holding_one_plan(mesh.nodes, "builtin"), timeout=60)
    plan = mesh.nodes[0].experts.plans["builtin"].plan
    before = plan.fingerprint
    peer = next(n for n in mesh.nodes if n.node_id != plan.host)
    peer.experts._publish_model("builtin", expert_budget=1)  # room for no expert: too little
    await mesh.wait(lambda: all("builtin" in n.experts.errors for n in mesh.nodes), timeout=30)
    assert all(n.experts.plans["builtin"].plan.fingerprint == before for n in mesh.nodes)
    peer.experts._publish_model("builtin", expert_budget=SPLIT.memory)  # the plan's offers again
    await mesh.wait(lambda: not any("builtin" in n.experts.errors for n in mesh.nodes), timeout=30)
    assert all(n.experts.plans["builtin"].plan.fingerprint == before for n in mesh.nodes)


async def test_a_failed_expert_load_stays_reported(mesh, monkeypatch):
    """A node that cannot load its experts says why until a load succeeds (planning again on
    the same inputs does not clear it)."""

    def fail(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr("mesh_node.expert_parallel.coordinator.load_expert_banks", fail)
    for _ in range(3):
        await mesh.add(experts=SPLIT)
    node = mesh.nodes[1]

    def reported() -> bool:
        return "disk on fire" in node.experts.errors.get("builtin", "")

    await mesh.wait(reported, timeout=60)
    seen = []  # whether it is reported after each time the node plans again (same inputs)
    evaluate = node.experts.evaluate

    def evaluated() -> None:
        evaluate()
        seen.append(reported())

    monkeypatch.setattr(node.experts, "evaluate", evaluated)
    await mesh.wait(lambda: len(seen) >= 3, timeout=30)
    assert all(seen)
    assert "disk on fire" in node.experts.status()[0]["error"]


async def test_an_old_holder_drops_nothing_for_a_plan_that_was_superseded(mesh, monkeypatch):
    """A budget change moves experts off a node (plan 2); while their new holders are still
    loading them, the budget comes back (plan 3, which is plan 1 again: the node keeps them).
    When the loads of plan 2 finish and their holders publish them, the node must not give the
    experts up for plan 2's sake: at no moment does it stop holding what plan 3 gives it."""
    for _ in range(3):
        await mesh.add(experts=SPLIT)
    await mesh.wait(lambda: holding_one_plan(mesh.nodes, "builtin"), timeout=60)
    first = mesh.nodes[0].experts.plans["builtin"].plan
    gate = threading.Event()  # loads wait on it while set to wait
    loading = threading.Event()
    load = coordinator.load_expert_banks

    def gated_load(*args, **kwargs):
        loading.set()
        assert gate.wait(30), "the test never opened the gate"
        return load(*args, **kwargs)

    monkeypatch.setattr(coordinator, "load_expert_banks", gated_load)
    grown = mesh.nodes[2]
    grown.experts._publish_model("builtin", expert_budget=SPLIT.memory * 2)
    second = await plan_after(mesh, first)
    assert await asyncio.to_thread(loading.wait, 30)  # plan 2's new holders are loading
    losers = {
        n.node_id: {
            (layer, e)
            for layer, ids in first.experts_of(n.node_id).items()
            for e in ids
            if e not in second.experts_of(n.node_id).get(layer, ())
        }
        for n in mesh.nodes
    }
    assert any(losers.values())  # plan 2 moves some experts off some node
    # from here on, record every moment a node stops holding one of plan 1's experts
    lost = []
    for node in mesh.nodes:
        replace = node.expert_service.replace_layer

        def replace_layer(model, layer, bank, node=node, replace=replace):
            kept = set(bank.expert_ids) if bank is not None else set()
            lost.extend(
                (node.node_id, layer, e)
                for e in first.experts_of(node.node_id).get(layer, ())
                if e not in kept
            )
            replace(model, layer, bank)

        monkeypatch.setattr(node.expert_service, "replace_layer", replace_layer)
    grown.experts._publish_model("builtin", expert_budget=SPLIT.memory)  # plan 1's offers
    await mesh.wait(
        lambda: all(
            n.experts.plans["builtin"].plan.fingerprint == first.fingerprint for n in mesh.nodes
        ),
        timeout=30,
    )
    gate.set()  # plan 2's loads finish; their holders publish them

    def settled() -> bool:  # plan 2's work done, and each node then holding plan 3's part
        applying = [n.experts._reconciling.get("builtin") for n in mesh.nodes]
        return all(t is None or t.done() for t in applying) and holding_one_plan(
            mesh.nodes, "builtin"
        )

    await mesh.wait(settled, timeout=60)
    assert mesh.nodes[0].experts.plans["builtin"].plan.fingerprint == first.fingerprint
    assert lost == []


async def plan_after(mesh, plan):
    """The builtin model's next plan after `plan`, once every node has it."""
    await mesh.wait(
        lambda: all(
            n.experts.plans["builtin"].plan.fingerprint != plan.fingerprint for n in mesh.nodes
        ),
        timeout=30,
    )
    return mesh.nodes[0].experts.plans["builtin"].plan


def holding_one_plan(nodes, model: str) -> bool:
    """Every node has computed the same plan for `model` and holds exactly its part of it."""
    plans = [n.experts.plans.get(model) for n in nodes]
    if any(p is None for p in plans):
        return False
    if len({p.plan.fingerprint for p in plans}) != 1:
        return False
    return all(
        n.expert_service.nbytes(model) == p.plan.bytes_of(n.node_id)
        for n, p in zip(nodes, plans, strict=True)
    )


def replicas_are_distinct(plan) -> bool:
    for layer in range(4):
        for expert in range(8):
            holders = plan.holders(layer, expert)
            if len(set(holders)) != len(holders) or not holders:
                return False
    return True


@pytest.mark.parametrize("device", DEVICES)
async def test_remote_experts_give_the_single_node_logits_in_fp32(device):
    """The dispatcher, with half the experts 'remote' (computed by a second bank through the
    same path a peer uses), gives logits within 1e-3 of the whole model on the CPU, in float32."""
    import threading

    full = load_model(BUILTIN_DIR, device="cpu", dtype="float32")
    trunk = load_model(BUILTIN_DIR, plan=LoadPlan.trunk(), device=device, dtype="float32")
    even = {layer: range(0, 8, 2) for layer in range(4)}
    odd = {layer: range(1, 8, 2) for layer in range(4)}
    near = load_expert_banks(BUILTIN_DIR, even, device=device, dtype="float32")
    far = load_expert_banks(BUILTIN_DIR, odd, device=device, dtype="float32")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    from mesh_node.identity import NodeIdentity

    peer = NodeIdentity.generate().node_id
    routes = ExpertRoutes()
    routes.update({(layer, e): (peer,) for layer in range(4) for e in range(1, 8, 2)})
    stats = DispatchStats()

    async def call(node, layer, experts, counts, rows, token_of, weights):
        assert node == peer
        return far[layer].run_weighted(rows.clone(), experts, counts, token_of, weights)

    for layer in trunk.moe_layers():
        layer.experts = RemoteExperts(
            layer.layer, lambda i=layer.layer: near[i], routes, call, loop, stats
        )
    try:
        ids = torch.tensor([[3, 17, 42, 99, 5, 250, 7, 8, 9, 10]])
        positions = torch.arange(ids.shape[1])[None]
        with torch.inference_mode():
            want = full(ids, positions, full.new_cache(1, 16), slot_start=0, kv_len=10)
            ids, positions = ids.to(device), positions.to(device)
            got = trunk(ids, positions, trunk.new_cache(1, 16), slot_start=0, kv_len=10).cpu()
        assert (got - want).abs().max().item() < 1e-3
        assert stats.remote_calls == 4  # one call per layer to the one peer
        # an expert nobody holds: a clear error after the holder wait, not a wrong answer
        routes.update({})
        for layer in trunk.moe_layers():
            layer.experts.config = DispatchConfig(holder_wait=0.2)
        with pytest.raises(ExpertsUnavailable, match="no live holder"), torch.inference_mode():
            trunk(ids, positions, trunk.new_cache(1, 16), slot_start=0, kv_len=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_a_token_whose_experts_are_all_here_is_one_local_call(monkeypatch):
    """run_combined for one token held wholly on the host: no remote call, no dispatch round
    (no request built); the same sums as the general path (several tokens) gives for it."""

    from mesh_node.expert_parallel import dispatch

    built = mock.Mock(wraps=dispatch._request_of)
    monkeypatch.setattr(dispatch, "_request_of", built)
    banks = load_expert_banks(BUILTIN_DIR, {0: range(8)}, device="cpu", dtype="float32")
    remote_calls = []

    async def call(*args):
        remote_calls.append(args)
        raise AssertionError("no expert of these tokens lives elsewhere")

    loop = asyncio.new_event_loop()
    stats = DispatchStats()
    try:
        experts = RemoteExperts(0, lambda: banks[0], ExpertRoutes(), call, loop, stats)
        generator = torch.Generator().manual_seed(3)
        x = torch.randn(3, banks[0].down.shape[0], generator=generator)
        chosen = torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(3)])
        weights = torch.rand(3, 2, generator=generator)
        several = experts.run_combined(x, chosen, weights)
        assert built.call_count == 1  # the general path: one local request for the three tokens
        for t in range(3):
            one = experts.run_combined(x[t : t + 1], chosen[t : t + 1], weights[t : t + 1])
            assert one.dtype == torch.float32 and one.shape == (1, x.shape[1])
            assert torch.allclose(one[0], several[t], atol=1e-6)
        assert stats.steps == 4 and stats.remote_calls == 0 and not remote_calls
        assert built.call_count == 1  # a single token took the one local call
    finally:
        loop.close()


async def test_a_call_to_a_peer_turning_suspect_fails_over_at_once(
    mesh, single_node_answers, monkeypatch
):
    """A peer that stops answering mid-call (its compute is stuck) and that the host's
    membership then suspects: the call goes to another holder right away, not at the call's
    30 s timeout, and the answer is the single node's."""
    import threading

    from mesh_node.expert_parallel import service

    for _ in range(3):
        await mesh.add(experts=SPLIT)
    await mesh.wait(lambda: len(mesh.hosts_of("builtin")) == 1, timeout=60)
    host = mesh.hosts_of("builtin")[0]
    await mesh.wait(lambda: all(n.experts.status()[0].get("agreed") for n in mesh.nodes))
    stalled = next(n for n in mesh.nodes if n is not host)
    banks = {id(bank) for bank in stalled.expert_service._banks["builtin"].values()}
    entered, release = threading.Event(), threading.Event()
    compute = service._compute

    def stuck_compute(bank, *args):
        if id(bank) in banks and not release.is_set():
            entered.set()
            release.wait(60)
        return compute(bank, *args)

    monkeypatch.setattr(service, "_compute", stuck_compute)
    stats = host.experts.stats["builtin"]
    loop = asyncio.get_running_loop()
    try:
        generation = asyncio.ensure_future(answer(host, chat("builtin", PROMPTS[0])))
        assert await asyncio.to_thread(entered.wait, 30)  # a call waits on the stuck peer
        before = stats.failovers
        suspected = loop.time()
        host.membership._suspect(host.membership.table.get(stalled.node_id))
        await mesh.wait(lambda: stats.failovers > before, timeout=10)
        assert loop.time() - suspected < 5
        release.set()
        text, _ = await asyncio.wait_for(generation, 60)
        assert text == single_node_answers[0]
    finally:
        release.set()


def _by_node_id(n: int):
    from mesh_node.identity import NodeIdentity

    return sorted((NodeIdentity.generate() for _ in range(n)), key=lambda i: i.node_id)


async def test_a_split_models_host_loads_the_whole_model_once_its_expert_holders_leave(mesh):
    """A host without an expert budget of its own runs the trunk while another node holds
    the experts; when that node leaves the model is no longer split, and the host (which has
    room for all of it) swaps its trunk for the whole model instead of failing every request."""
    fast = DispatchConfig(holder_wait=2.0, call_timeout=5.0)
    low, high = _by_node_id(2)
    host = await mesh.add(identity=low, experts=ExpertParallelConfig(enabled=False, dispatch=fast))
    holder = await mesh.add(
        identity=high, experts=ExpertParallelConfig(enabled=True, memory=64 << 20, dispatch=fast)
    )
    await mesh.wait(lambda: mesh.hosts_of("builtin") == [host], timeout=60)
    assert host.experts.is_split("builtin")
    text, _ = await answer(host, chat("builtin", "What is 348 + 276?"))
    assert text == "624"
    trunk = host.local.generators["builtin"]
    await holder.stop()
    mesh.nodes.remove(holder)
    await mesh.wait(lambda: not host.experts.is_split("builtin"), timeout=30)
    await mesh.wait(  # swapped for the whole model (the trunk drained and closed)
        lambda: host.local.generators.get("builtin") not in (None, trunk), timeout=30
    )
    async with asyncio.timeout(30):
        text, _ = await answer(host, chat("builtin", "What is 348 + 276?"))
    assert text == "624"


async def test_a_split_whose_offers_cannot_hold_the_experts_is_hosted_whole_where_it_fits(mesh):
    """One node offers the built-in model split (--moe-split) with room for 2 of its 32
    experts; the other, without the flag, has room for the whole model. The model is split
    (a node offers it so), but no plan fits: once the elected host has waited cover_timeout
    for more memory, it hosts the whole model (before, it waited again, for ever: the model was
    served nowhere while a node had room for all of it)."""
    from mesh_node.serving.hosting import HostingConfig

    short = HostingConfig(cover_timeout=3.0)
    low, high = _by_node_id(2)
    host = await mesh.add(identity=low, hosting=short)
    weak = await mesh.add(
        identity=high, hosting=short, experts=ExpertParallelConfig(enabled=True, memory=1 << 20)
    )
    await mesh.wait(lambda: mesh.hosts_of("builtin") == [host], timeout=30)
    assert host.experts.is_split("builtin")
    async with asyncio.timeout(30):
        text, _ = await answer(weak, chat("builtin", "What is 348 + 276?"))
    assert text == "624"
    assert weak.expert_service.held("builtin") == {}


async def test_a_host_whose_experts_find_no_holders_in_time_keeps_offering_and_retries(
    mesh, monkeypatch
):
    """Too little memory in the mesh for the experts at first (and on the host for the whole
    model: 8 MiB free, the model 13.7 MB): the elected host gives up after cover_timeout, but
    keeps offering the model (and its budget); once enough memory joins, the model is served.
    (Before, it withdrew the model from the mesh until a restart.)"""
    from mesh_node import node as node_module
    from mesh_node.membership.messages import Hardware
    from mesh_node.serving.hosting import HostingConfig

    monkeypatch.setattr(
        node_module, "probe_hardware", lambda with_gpus=True: Hardware(2, 1 << 30, 8 << 20)
    )
    short = HostingConfig(cover_timeout=3.0)
    low, high = _by_node_id(2)
    first = await mesh.add(
        identity=low, hosting=short, experts=ExpertParallelConfig(enabled=True, memory=6 << 20)
    )
    await mesh.wait(lambda: "builtin" in first.hosting.failed, timeout=30)
    offered = first.membership.self_state.current.models_on_disk
    assert [m.name for m in offered] == ["builtin"] and offered[0].expert_budget > 0
    await mesh.add(
        identity=high, hosting=short, experts=ExpertParallelConfig(enabled=True, memory=10 << 20)
    )
    await mesh.wait(lambda: bool(mesh.hosts_of("builtin")), timeout=60)
    host = mesh.hosts_of("builtin")[0]
    text, _ = await answer(host, chat("builtin", "What is 348 + 276?"))
    assert text == "624"


async def test_rankings_of_another_checkpoint_are_refused_and_fetched_again_only_later(
    mesh, monkeypatch, tmp_path
):
    """The host publishes rankings that do not fit the other node's copy of the model (here:
    measured over one MoE layer of four, as another checkpoint's would be): the other node
    refuses them, says why, and asks again only after a back-off, not every second."""
    monkeypatch.setenv("MESH_NODE_CACHE", str(tmp_path))
    measure = rankings_mod.analyze

    def one_layer(path, kind="micro", *args, **kwargs):
        r = measure(path, kind, *args, **kwargs)
        return dataclasses.replace(
            r,
            layers=r.layers[:1],
            gate_mass=r.gate_mass[:1],
            selection=r.selection[:1],
            coselection=r.coselection[:1],
        )

    monkeypatch.setattr(rankings_mod, "analyze", one_layer)
    asked: list[str] = []
    serve = coordinator.ExpertParallel._serve_rankings

    async def counted(self, ctx, request):
        asked.append(request.digest)
        return await serve(self, ctx, request)

    monkeypatch.setattr(coordinator.ExpertParallel, "_serve_rankings", counted)
    first = await mesh.add(experts=SPLIT)
    second = await mesh.add(experts=SPLIT)

    def refused() -> str:
        for node in (first, second):
            error = node.experts.errors.get("builtin", "")
            if "not the same model" in error:
                return error
        return ""

    await mesh.wait(refused, timeout=60)
    assert "cannot get the host's expert rankings" in refused()
    assert "8 experts in MoE layers [0]; this node's builtin has 8 experts in MoE layers 0-3" in (
        refused()
    )
    count = len(asked)
    await asyncio.sleep(2.5)  # back-off: 1 s, then 2 s, then 4 s...
    assert len(asked) <= count + 2, f"asked {len(asked) - count} more times in 2.5 s"


async def test_split_models_gossiped_by_a_peer_but_not_on_disk_here_cost_nothing(mesh):
    """A peer may gossip any number of model names offered split: a node keeps routes (and
    plans) only for models it has on disk."""
    from mesh_node.membership.messages import ModelInfo

    node = await mesh.add(experts=SPLIT)
    peer = await mesh.add(experts=SPLIT)
    await mesh.wait(lambda: "builtin" in node.experts.routes)
    for round_ in range(5):
        fake = [
            ModelInfo(f"made-up-{round_}-{i}", "qwen3_moe", 1 << 20, 1, experts=8, expert_budget=1)
            for i in range(50)
        ]
        peer.membership.update_state(
            models_on_disk=[*peer.membership.self_state.current.models_on_disk, *fake]
        )
        await mesh.wait(
            lambda round_=round_: any(
                i.name == f"made-up-{round_}-0"
                for i in node.membership.table.get(peer.node_id).state.models_on_disk
            )
        )
        node.experts.evaluate()
    assert set(node.experts.routes) == {"builtin"}
    assert set(node.experts.plans) <= {"builtin"}


async def test_rankings_kept_are_bounded_and_those_in_use_stay(mesh):
    for _ in range(3):
        await mesh.add(experts=SPLIT)
    node = mesh.nodes[0]
    await mesh.wait(lambda: node.experts.plans.get("builtin") is not None, timeout=60)
    in_use = node.experts.plans["builtin"].inputs[2]
    if in_use == coordinator.UNIFORM:
        pytest.skip("planned without rankings")
    rankings = node.experts.rankings[in_use]
    for n in range(3 * coordinator.MAX_RANKINGS):
        node.experts._keep_rankings(f"{n:016x}", dataclasses.replace(rankings, tokens=1000 + n))
    assert len(node.experts.rankings) <= coordinator.MAX_RANKINGS
    assert in_use in node.experts.rankings  # the plan's, however old
    assert f"{3 * coordinator.MAX_RANKINGS - 1:016x}" in node.experts.rankings  # the newest


async def test_a_node_waiting_to_give_experts_up_follows_a_newer_plan_at_once(mesh, monkeypatch):
    """Plan 2 moves experts to a node that does not yet say it holds them, so their old holder
    waits (up to release_wait) before giving them up. Meanwhile that holder offers more memory:
    plan 3 gives it experts to load, and it loads them now, not once that wait is over."""
    slow_release = dataclasses.replace(SPLIT, release_wait=300.0)
    for _ in range(3):
        await mesh.add(experts=slow_release)
    await mesh.wait(lambda: holding_one_plan(mesh.nodes, "builtin"), timeout=60)
    first = mesh.nodes[0].experts.plans["builtin"].plan
    taker = next(n for n in mesh.nodes if n.node_id != first.host)
    monkeypatch.setattr(taker.experts, "_publish_shards", lambda: None)  # says nothing
    taker.experts._publish_model("builtin", expert_budget=SPLIT.memory * 2)
    second = await plan_after(mesh, first)
    giver = next(
        n
        for n in mesh.nodes
        if n is not taker and second.bytes_of(n.node_id) < first.bytes_of(n.node_id)
    )
    await mesh.wait(lambda: not giver.experts._reconciling["builtin"].done())  # waiting
    giver.experts._publish_model("builtin", expert_budget=SPLIT.memory * 4)
    third = await plan_after(mesh, second)

    def missing() -> set[tuple[int, int]]:  # plan 3's experts of the giver it does not hold
        held = giver.expert_service.held("builtin")
        wanted = third.experts_of(giver.node_id).items()
        return {(layer, e) for layer, ids in wanted for e in ids if e not in held.get(layer, ())}

    assert missing()
    # loaded now (it may keep what it gives up until the taker says it holds that)
    await mesh.wait(lambda: not missing(), timeout=30)


async def test_a_new_plan_is_loaded_without_waiting_out_an_old_failures_backoff(mesh):
    for _ in range(3):
        await mesh.add(experts=SPLIT)
    await mesh.wait(lambda: holding_one_plan(mesh.nodes, "builtin"), timeout=60)
    first = mesh.nodes[0].experts.plans["builtin"].plan
    for node in mesh.nodes:  # as after six failed loads in a row: the next try in 60 s
        node.experts._failures["builtin"] = 6
        node.experts._retry_at["builtin"] = time.monotonic() + 60
    grown = mesh.nodes[2]
    grown.experts._publish_model("builtin", expert_budget=SPLIT.memory * 2)
    await mesh.wait(
        lambda: (
            holding_one_plan(mesh.nodes, "builtin")
            and mesh.nodes[0].experts.plans["builtin"].plan.fingerprint != first.fingerprint
        ),
        timeout=30,
    )


async def test_a_node_that_lists_a_model_twice_does_not_stop_the_plan(mesh):
    for _ in range(3):
        await mesh.add(experts=SPLIT)
    await mesh.wait(lambda: holding_one_plan(mesh.nodes, "builtin"), timeout=60)
    odd = mesh.nodes[1]
    infos = odd.membership.self_state.current.models_on_disk
    doubled = [dataclasses.replace(i, expert_budget=SPLIT.memory * 2) for i in infos]
    twice = [*doubled, *(dataclasses.replace(i, expert_budget=1) for i in infos)]
    odd.membership.update_state(models_on_disk=twice)
    await mesh.wait(lambda: all(n.experts.offers_of("builtin") for n in mesh.nodes))
    await mesh.wait(
        lambda: (
            holding_one_plan(mesh.nodes, "builtin")
            and mesh.nodes[0].experts.plans["builtin"].plan.bytes_of(odd.node_id) > SPLIT.memory
        ),  # planned from the first entry, twice the budget
        timeout=30,
    )
    assert not any("builtin" in n.experts.errors for n in mesh.nodes)


def _free_for_experts_on(device: str, ram_free: int) -> int:
    hardware = mock.Mock(ram_free=ram_free)
    experts = coordinator.ExpertParallel.__new__(coordinator.ExpertParallel)
    experts.device = device
    experts.membership = mock.Mock()
    experts.membership.self_state.current.hardware = hardware
    return experts._free_for_experts()


def test_experts_loading_on_the_cpu_are_budgeted_from_free_ram():
    assert _free_for_experts_on("cpu", 123 << 30) == 123 << 30


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_experts_loading_on_a_gpu_are_budgeted_from_its_free_memory_not_the_rams():
    free = _free_for_experts_on("cuda", 1 << 50)  # far more RAM than any GPU holds
    assert 0 < free <= torch.cuda.get_device_properties(0).total_memory
