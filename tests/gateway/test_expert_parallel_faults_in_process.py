"""Expert parallelism across real nodes in one process (in-memory network, real engine), under
faults: what the client gets when experts have no holder, a peer that stalls but stays
alive, and a peer whose copy of the model is another checkpoint of the same name (in the plan,
or holding an old plan's experts when a host of another copy takes over)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mesh_node.engine import GenerationRequest, Generator
from mesh_node.engine.sampling import SamplingParams
from mesh_node.expert_parallel import service
from mesh_node.expert_parallel.coordinator import ExpertParallelConfig
from mesh_node.expert_parallel.dispatch import DispatchConfig
from mesh_node.identity import NodeIdentity
from mesh_node.placement.election import Election
from mesh_node.serving.gateway import GatewayConfig
from mesh_node.serving.hosting import HostingConfig
from mesh_node.serving.requests import CompletionRequest, ExpertsMissing, ServingError
from tests.gateway.mesh import answer, chat
from tests.gateway.slow_model import build_random_checkpoint
from tests.gateway.slow_moe_model import TINY_MOE
from tests.gateway.test_expert_parallel_in_process import holding_one_plan

PROMPT = "What is 348 + 276?"
FAST = DispatchConfig(call_timeout=1.0, holder_wait=2.0)
SHORT_HOST_WAIT = GatewayConfig(host_wait=5.0)


async def split_three_ways(mesh, memory: int, dispatch: DispatchConfig, **config):
    for _ in range(3):
        await mesh.add(
            experts=ExpertParallelConfig(enabled=True, memory=memory, dispatch=dispatch, **config),
            gateway=SHORT_HOST_WAIT,
        )
    await mesh.wait(lambda: len(mesh.hosts_of("builtin")) == 1, timeout=60)
    await mesh.wait(lambda: holding_one_plan(mesh.nodes, "builtin"), timeout=60)
    return mesh.hosts_of("builtin")[0]


async def test_experts_without_a_holder_fail_the_request_saying_so(mesh):
    """Three nodes with room for the experts only together (6 MiB each); one leaves, the two
    left cannot hold every expert (no plan fits), so some experts have no live holder. The
    step fails after holder_wait, and the client (through the host or another node) is told
    at once which experts have no holder: 503 experts_unavailable, not a wait of host_wait
    for another host (any host would meet the same mesh) ending in "no host ... in time"."""
    host = await split_three_ways(mesh, 6 << 20, FAST)
    leaving = next(n for n in mesh.nodes if n is not host)
    caller = next(n for n in mesh.nodes if n is not host and n is not leaving)
    mesh.nodes.remove(leaving)
    await leaving.stop()
    await mesh.wait(lambda: "builtin" in host.experts.errors, timeout=30)  # no plan fits
    for via in (host, caller):
        with pytest.raises(ServingError) as failed:
            async with asyncio.timeout(60):
                await answer(via, chat("builtin", PROMPT))
        assert isinstance(failed.value, ExpertsMissing) and failed.value.status == 503
        assert failed.value.code == "experts_unavailable"
        assert "no live holder" in failed.value.message, (
            f"through {'the host' if via is host else 'another node'} the client got "
            f"{type(failed.value).__name__}: {failed.value.message!r}"
        )


@pytest.fixture
def single_node_answer():
    with Generator.from_pretrained(None, device="cpu") as generator:
        return generator.generate(
            GenerationRequest(
                messages=[{"role": "user", "content": PROMPT}],
                sampling=SamplingParams(max_tokens=32),
            )
        ).text


async def test_a_peer_that_stalls_but_stays_alive_does_not_fail_every_request(
    mesh, monkeypatch, single_node_answer
):
    """A peer's expert computation hangs (a stuck GPU, a thread deadlock, swapping) while its
    event loop still answers SWIM: it stays alive. The two others have room for every expert
    (8 MiB each). Once a computation has run past call_timeout the peer withdraws its offer,
    the mesh plans without it, the others load its experts and the answer completes as the
    single node's; once it answers again, it offers its experts again (reoffer_after)."""
    dispatch = DispatchConfig(call_timeout=1.0, holder_wait=10.0)
    host = await split_three_ways(mesh, 8 << 20, dispatch, reoffer_after=1.0)
    stalled = next(n for n in mesh.nodes if n is not host)
    banks = {id(bank) for bank in stalled.expert_service._banks["builtin"].values()}
    release = threading.Event()
    compute = service._compute

    def stuck_compute(bank, *args):
        if id(bank) in banks:
            release.wait(90)  # (bounded: the test sets it when done)
        return compute(bank, *args)

    monkeypatch.setattr(service, "_compute", stuck_compute)
    try:
        async with asyncio.timeout(80):
            text, deltas = await answer(host, chat("builtin", PROMPT))
        assert text == single_node_answer
        assert deltas[-1].finish_reason in ("stop", "length")
        assert budget_of(host, stalled) == 0  # withdrawn, as every node sees
    finally:
        release.set()
    await mesh.wait(lambda: budget_of(host, stalled) == 8 << 20, timeout=30)  # offered again


def budget_of(observer, node) -> int:
    """The expert budget `observer` sees `node` offer for the built-in model."""
    state = observer.membership.table.get(node.node_id).state
    return next(i.expert_budget for i in state.models_on_disk if i.name == "builtin")


TWO_LAYERS = {**TINY_MOE, "num_hidden_layers": 2}
NOBODY = Election("", (), ())


async def test_a_peer_with_another_checkpoint_of_the_same_name_is_not_used(mesh, tmp_path):
    """Two nodes have a model of the same name and shape but different weights (another
    revision or fine-tune saved under the same folder name). Their ModelInfos carry different
    checkpoint fingerprints, so the plan leaves the other copy's node out: the host holds
    every expert itself and its output is its own checkpoint's, not a mix of two models."""
    ours = build_random_checkpoint(tmp_path / "a", "tiny-moe", "qwen3_moe", 1, **TWO_LAYERS)
    theirs = build_random_checkpoint(tmp_path / "b", "tiny-moe", "qwen3_moe", 2, **TWO_LAYERS)
    prompt = "Hello there"
    with Generator.from_pretrained(str(ours), device="cpu") as alone:
        expected = alone.generate(
            GenerationRequest(prompt=prompt, sampling=SamplingParams(max_tokens=20))
        ).text
    low, high = sorted((NodeIdentity.generate() for _ in range(2)), key=lambda i: i.node_id)
    host = await mesh.add(
        identity=low,
        models=[str(ours)],
        experts=ExpertParallelConfig(enabled=True, memory=64 << 20),
    )
    await mesh.add(
        identity=high,
        models=[str(theirs)],
        experts=ExpertParallelConfig(enabled=True, memory=10 << 20),
    )
    await mesh.wait(lambda: mesh.hosts_of("tiny-moe") == [host], timeout=60)
    await mesh.wait(lambda: holding_one_plan(mesh.nodes, "tiny-moe"), timeout=60)
    request = CompletionRequest(
        model="tiny-moe",
        request_id="two-checkpoints",
        prompt=prompt,
        sampling=SamplingParams(max_tokens=20),
    )
    try:
        async with asyncio.timeout(60):
            text, _ = await answer(host, request)
    except ServingError:
        return  # refused with an error: acceptable
    remote = host.experts.stats["tiny-moe"].remote_calls
    assert text == expected, f"{remote} expert calls to the other checkpoint's node changed it"
    assert remote == 0
    other = next(n for n in mesh.nodes if n is not host)
    assert other.expert_service.held("tiny-moe") == {}


async def test_a_new_host_calls_no_experts_an_old_plan_left_on_a_node_of_another_checkpoint(
    mesh, tmp_path
):
    """Two nodes with one checkpoint of a model split it (the first hosts, the last holds
    every expert); a node with another checkpoint of the same name joins, without an expert
    budget. When the host leaves, the newcomer is elected (lower node id), and no plan fits
    (the other copy's node is left out of it): the holder keeps the experts of its last plan
    and publishes them. The new host must not count them as covering its model, nor call
    them: its answers would be its trunk with another model's experts. It says the experts
    have no holder instead (and then hosts its own copy whole)."""
    fast = DispatchConfig(holder_wait=2.0, call_timeout=5.0)
    ours = build_random_checkpoint(tmp_path / "a", "tiny-moe", "qwen3_moe", 1, **TWO_LAYERS)
    theirs = build_random_checkpoint(tmp_path / "b", "tiny-moe", "qwen3_moe", 2, **TWO_LAYERS)
    with Generator.from_pretrained(str(ours), device="cpu") as alone:
        expected = alone.generate(GenerationRequest(prompt="Hello there")).text
    first, newcomer, holder = sorted(
        (NodeIdentity.generate() for _ in range(3)), key=lambda i: i.node_id
    )

    async def add(identity, folder, **experts):
        return await mesh.add(
            identity=identity,
            models=[str(folder)],
            hosting=HostingConfig(cover_timeout=5.0),
            experts=ExpertParallelConfig(dispatch=fast, **experts),
            gateway=SHORT_HOST_WAIT,
        )

    old_host = await add(first, theirs, enabled=False)
    holding = await add(holder, theirs, enabled=True, memory=64 << 20)
    await mesh.wait(lambda: mesh.hosts_of("tiny-moe") == [old_host], timeout=60)
    await mesh.wait(lambda: holding_one_plan(mesh.nodes, "tiny-moe"), timeout=60)
    new_host = await add(newcomer, ours, enabled=False)
    await mesh.wait(
        lambda: getattr(holding.membership.table.get(newcomer.node_id), "state", None) is not None
    )
    await old_host.stop()
    mesh.nodes.remove(old_host)
    hosting = new_host.hosting
    await mesh.wait(lambda: hosting.elections.get("tiny-moe", NOBODY).hosts == (newcomer.node_id,))
    await mesh.wait(lambda: "tiny-moe" in new_host.experts.errors)  # no plan fits
    assert holding.expert_service.held("tiny-moe")  # (the old plan's experts, still published)
    assert new_host.experts.coverage("tiny-moe"), "another checkpoint's experts count as held"
    request = CompletionRequest(
        model="tiny-moe", request_id="mixed", prompt="Hello there", sampling=SamplingParams()
    )
    try:  # (an error, or once the host gave up waiting for holders, its own model whole)
        async with asyncio.timeout(60):
            text, _ = await answer(new_host, request)
        assert text == expected
    except ServingError:
        pass
    stats = new_host.experts.stats.get("tiny-moe")
    assert stats is None or stats.remote_calls == 0, "it called another checkpoint's experts"
