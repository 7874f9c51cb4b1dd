"""Serving across a mesh of real nodes in one process (in-memory network, real engine):
election, tunneling through a node that does not host, failover mid-answer, concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

import aiohttp
import pytest

from mesh_node.engine import GenerationRequest, Generator, GeneratorClosedError
from mesh_node.engine.builtin_skills import held_out_set
from mesh_node.engine.sampling import SamplingParams
from mesh_node.membership.messages import Load
from mesh_node.placement.rankings import checkpoint_fingerprint
from mesh_node.serving.requests import BadRequest, CompletionRequest, GenerationFailed
from tests.gateway.mesh import answer, chat
from tests.gateway.slow_model import NAME as SLOW
from tests.gateway.slow_model import build_slow_model


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory):
    return build_slow_model(tmp_path_factory.mktemp("models"))


def uninterrupted(model, prompt: str, max_tokens: int) -> str:
    """The text one engine alone gives for the prompt (greedy): what an answer that failed
    over must equal."""
    with Generator.from_pretrained(str(model)) as alone:
        sampling = SamplingParams(max_tokens=max_tokens)
        return alone.generate(GenerationRequest(prompt=prompt, sampling=sampling)).text


async def test_a_node_that_does_not_host_answers_through_the_host(mesh):
    for _ in range(3):
        await mesh.add()
    # one host, the same on every node (nodes that joined while the first was loading may
    # briefly elect themselves until they hear it serves), and the status shows it
    await mesh.wait(lambda: len(mesh.hosts_of("builtin")) == 1 and _agreed(mesh, "builtin"))
    host = mesh.hosts_of("builtin")[0]
    for node in mesh.nodes:
        assert node.hosting.elections["builtin"].hosts == (host.node_id,)
    other = next(n for n in mesh.nodes if n is not host)
    text, deltas = await answer(other, chat("builtin", "What is 348 + 276?"))
    assert text == "624"
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens >= 3
    assert other.gateway.model_ids() == ["builtin"]
    status = other.view.status()
    assert status["hosting"][0]["hosts"] == [str(host.node_id)]


def _agreed(mesh, model: str) -> bool:
    """Every node elects the one node that runs the model, and sees only it serving it."""
    host = mesh.hosts_of(model)[0].node_id
    return all(
        model in n.hosting.elections
        and n.hosting.elections[model].hosts == (host,)
        and [m.node_id for m in n.membership.table if m.state and model in m.state.models_served]
        == [host]
        for n in mesh.nodes
    )


async def test_a_host_that_says_it_does_not_serve_is_tried_again_once_its_state_changes(
    mesh, caplog
):
    caplog.set_level(logging.INFO, "mesh_node.gateway")
    host = await mesh.add()
    caller = await mesh.add(client=True)
    await mesh.wait(lambda: len(mesh.hosts_of("builtin")) == 1 and _agreed(mesh, "builtin"))
    # the caller's view is stale: the host has just dropped the model and not yet said so
    generator = host.local.generators.pop("builtin")
    job = asyncio.ensure_future(answer(caller, chat("builtin", "What is 348 + 276?")))
    await mesh.wait(lambda: "does not serve builtin" in caplog.text)
    assert not job.done()  # not a failed host: waiting for it to change
    host.local.generators["builtin"] = generator
    host.membership.update_state(load=Load(inflight=0, tokens_per_s=0.5))  # a new state version
    text, _ = await asyncio.wait_for(job, 30)
    assert text == "624"


async def test_a_client_node_never_hosts_but_answers(mesh):
    client = await mesh.add(client=True)
    await mesh.add()
    await mesh.wait(lambda: len(mesh.hosts_of("builtin")) == 1)
    assert mesh.hosts_of("builtin")[0] is not client
    text, _ = await answer(client, chat("builtin", "Reverse the words: blue green red"))
    assert text == "red green blue"


async def test_a_prompt_too_long_for_the_hosts_context_says_so_in_openais_terms(mesh):
    """Through the tunnel too: a client node answers with OpenAI's context_length_exceeded
    (which agent frameworks look for), naming the field, as the host itself would."""
    client = await mesh.add(client=True)
    host = await mesh.add()
    await mesh.wait(lambda: len(mesh.hosts_of("builtin")) == 1)
    request = chat("builtin", " ".join(["apple"] * 5000))
    for node in (client, host):
        with pytest.raises(BadRequest) as refused:
            await answer(node, request)
        assert refused.value.code == "context_length_exceeded"
        assert refused.value.param == "messages"
        assert "maximum context length is 256 tokens" in refused.value.message


async def test_a_prompt_over_the_frame_limit_is_refused_without_troubling_the_host(mesh, caplog):
    """The client node refuses it (400, the request's fault) before sending a byte: the
    host would only reset the stream after the whole prompt had crossed."""
    client = await mesh.add(client=True)
    await mesh.add()
    await mesh.wait(lambda: len(mesh.hosts_of("builtin")) == 1)
    too_large = pytest.raises(BadRequest, match="too large to pass to the host")
    with caplog.at_level(logging.INFO, "mesh_node.transport"), too_large as refused:
        await answer(client, chat("builtin", "apple " * 200_000))
    assert "not sent" in refused.value.message
    assert "FRAME_TOO_LARGE" not in caplog.text  # (the host's reset, before)
    text, _ = await answer(client, chat("builtin", "What is 348 + 276?"))
    assert text == "624"


async def test_the_host_dies_mid_answer_and_the_answer_goes_on_identically(
    mesh, slow_model, caplog
):
    prompt = "The mesh keeps going"
    expected = uninterrupted(slow_model, prompt, max_tokens=160)
    for _ in range(3):
        await mesh.add(models=[str(slow_model)])
    await mesh.wait(lambda: len(mesh.hosts_of(SLOW)) == 1 and _agreed(mesh, SLOW))
    host = mesh.hosts_of(SLOW)[0]
    caller = next(n for n in mesh.nodes if n is not host)
    request = CompletionRequest(
        model=SLOW,
        request_id="failover-1",
        prompt=prompt,
        sampling=SamplingParams(max_tokens=160),
    )
    text, pieces = "", 0
    async with caller.gateway.stream(request) as stream:
        async for delta in stream:
            text += delta.text
            pieces += 1
            if pieces == 5:  # mid-answer: the host vanishes without a word
                mesh.network.crash(host.endpoint.address)
                mesh.nodes.remove(host)
                crashed = host
    assert text == expected
    assert delta.finish_reason == "length" and delta.completion_tokens == 160
    assert f"host {crashed.node_id.short} failed after" in caplog.text  # it did fail over
    assert mesh.hosts_of(SLOW) and crashed not in mesh.hosts_of(SLOW)
    await crashed.hosting.stop()  # its engine thread, still running in this process


async def test_a_host_dying_mid_answer_is_not_followed_by_another_checkpoint_of_its_name(
    mesh, slow_model, tmp_path, caplog
):
    """Two nodes hold different weights under one model name: each gossips its copy's
    checkpoint, and an answer whose host dies is not continued by the other copy (the text
    would splice two models); it fails at once, saying why."""
    other = build_slow_model(tmp_path, seed=4321)
    first = await mesh.add(models=[str(slow_model)])
    await mesh.wait(lambda: mesh.hosts_of(SLOW) == [first])
    second = await mesh.add(models=[str(other)])
    caller = await mesh.add(client=True)
    copies = {checkpoint_fingerprint(f)[:16] for f in (slow_model, other)}

    def gossiped() -> set[str]:
        return {
            info.checkpoint
            for node in (first, second)
            if (member := caller.membership.table.get(node.node_id)) and member.state
            for info in member.state.models_on_disk
        }

    await mesh.wait(lambda: gossiped() == copies and SLOW in caller.gateway.model_ids())
    assert len(copies) == 2
    request = CompletionRequest(
        model=SLOW, request_id="splice", prompt="One mesh", sampling=SamplingParams(max_tokens=160)
    )
    hosts, pieces = mesh.hosts_of(SLOW), 0
    with pytest.raises(GenerationFailed, match="this answer began on") as refused:
        async with caller.gateway.stream(request) as stream:
            async for _ in stream:
                pieces += 1
                if pieces == 3:  # every host of the moment vanishes mid-answer
                    for host in hosts:
                        mesh.network.crash(host.endpoint.address)
                        mesh.nodes.remove(host)
    assert "would mix two models" in refused.value.message
    assert f"node {second.node_id.short} holds another checkpoint of {SLOW}" in caplog.text
    for host in hosts:
        await host.hosting.stop()


async def test_an_answer_survives_a_short_blip_between_the_caller_and_the_only_host(
    mesh, slow_model
):
    """The host is cut off from the caller for 1 s (shorter than it takes to find it dead:
    it stays a member, elected, serving). The caller's prober closes the connection that
    carried the stream ("no answer to probes"); the answer goes on with the same host once it
    answers again, and equals an uninterrupted run (soak review: it waited host_wait for
    another host, never elected, and ended with "no host became ready in time")."""
    prompt = "The mesh keeps going"
    expected = uninterrupted(slow_model, prompt, max_tokens=300)
    host = await mesh.add(models=[str(slow_model)])
    caller = await mesh.add(client=True)
    await mesh.wait(
        lambda: any(m.state and SLOW in m.state.models_served for m in caller.membership.table)
    )
    request = CompletionRequest(
        model=SLOW, request_id="blip-1", prompt=prompt, sampling=SamplingParams(max_tokens=300)
    )
    text, pieces = "", 0
    async with asyncio.timeout(25):  # (an uninterrupted run takes a few seconds)
        async with caller.gateway.stream(request) as stream:
            async for delta in stream:
                text += delta.text
                pieces += 1
                if pieces == 5:  # a 1 s blip between the two nodes
                    mesh.network.partition([host.endpoint.address], [caller.endpoint.address])
                    await asyncio.sleep(1.0)
                    mesh.network.heal()
    assert text == expected


async def test_fifty_concurrent_requests_spread_over_the_nodes(mesh):
    for _ in range(3):
        await mesh.add()
    await mesh.wait(lambda: len(mesh.hosts_of("builtin")) >= 1)
    examples = [
        example
        for example in held_out_set(per_skill=20, seed=5)
        if example.skill in ("reverse_words", "sort_letters")  # skills it never misses
    ][:50]
    assert len(examples) == 40
    examples += examples[:10]
    jobs = [
        answer(mesh.nodes[i % 3], chat("builtin", ex.prompt, user=f"u{i}"))
        for i, ex in enumerate(examples)
    ]
    results = await asyncio.gather(*jobs)
    assert [text for text, _ in results] == [ex.answer for ex in examples]  # none lost or mixed
    assert all(deltas[-1].finish_reason == "stop" for _, deltas in results)


async def test_a_host_whose_engine_worker_dies_withdraws_the_model_and_loads_it_again(mesh):
    from mesh_node.serving.hosting import HostingConfig

    quick = HostingConfig(load_interval=0.2, revive_delay=1.0)
    host = await mesh.add(hosting=quick)
    caller = await mesh.add(hosting=quick, client=True)
    await mesh.wait(lambda: bool(mesh.hosts_of("builtin")) and _agreed(mesh, "builtin"))
    dead = host.local.generators["builtin"]
    full, go = threading.Event(), threading.Event()

    def hold_the_first_step_of_two(module, args):
        if args[0].shape[0] == 2 and not full.is_set():
            full.set()
            assert go.wait(30)

    dead.model.register_forward_pre_hook(hold_the_first_step_of_two)
    long = SamplingParams(max_tokens=200, ignore_eos=True)
    streams = [dead.submit(GenerationRequest(prompt_ids=[72, 105], sampling=long)) for _ in "ab"]
    assert await asyncio.to_thread(full.wait, 30)

    def broken_move(*args):
        raise RuntimeError("simulated device fault while moving the KV cache")

    dead.cache.move = broken_move  # the first request leaving moves the second one's rows
    streams[0].cancel()
    go.set()
    for stream in streams:
        with contextlib.suppress(GeneratorClosedError):
            await stream.collect()
    assert dead.failure is not None
    # withdrawn at once (nobody is sent to a dead engine), then loaded afresh
    await mesh.wait(
        lambda: (
            not any("builtin" in m.state.models_served for m in caller.membership.table if m.state)
        ),
        timeout=10,
    )
    assert "engine died" in host.hosting.failed["builtin"]
    await mesh.wait(lambda: bool(mesh.hosts_of("builtin")) and _agreed(mesh, "builtin"), 30)
    assert host.local.generators["builtin"] is not dead and "builtin" not in host.hosting.failed
    text, _ = await answer(caller, chat("builtin", "What is 348 + 276?"))
    assert text == "624"


async def test_a_model_that_finishes_loading_after_its_node_stopped_is_closed(mesh, monkeypatch):
    """Stopping cancels the load's task, not its thread: the generator it then builds for
    nobody is closed (its engine threads and memory are not left running)."""
    from mesh_node.serving import hosting

    built: list[Generator] = []
    release = threading.Event()
    load = hosting._load_generator

    def slow_load(resolved, config):
        release.wait(30)  # stands for a large checkpoint still being read
        built.append(load(resolved, config))
        return built[-1]

    monkeypatch.setattr(hosting, "_load_generator", slow_load)
    node = await mesh.add()
    await mesh.wait(lambda: "builtin" in node.hosting._busy)  # elected, loading
    await node.stop()
    mesh.nodes.remove(node)
    release.set()
    await mesh.wait(lambda: bool(built) and built[0]._closed, timeout=30)
    assert not built[0]._thread.is_alive()


async def test_a_nodes_api_and_console_answer_the_names_it_was_given(mesh):
    """`NodeConfig.allowed_hosts` (`--allow-host`) reaches both sites."""
    node = await mesh.add(client=True, api_port=0, console_port=0, allowed_hosts=("proxy.example",))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for url in (node.api.url + "/v1/models", node.console.url + "/api/status"):
            for host, status in (("proxy.example", 200), ("attacker.example", 403)):
                async with http.get(url, headers={"Host": host}) as response:
                    assert response.status == status, (url, host)


async def test_a_host_that_stops_lets_an_answer_tunnelled_through_another_node_finish(
    mesh, slow_model, caplog
):
    """SIGTERM on the only host: an answer it streams to another node's client finishes, as
    its own API clients' do (SHUTDOWN_GRACE), rather than breaking off with no host left."""
    prompt = "Leaving gracefully"
    expected = uninterrupted(slow_model, prompt, max_tokens=60)
    host = await mesh.add(models=[str(slow_model)])
    caller = await mesh.add(client=True)
    await mesh.wait(lambda: mesh.hosts_of(SLOW) == [host] and SLOW in caller.gateway.model_ids())
    request = CompletionRequest(
        model=SLOW, request_id="drain-1", prompt=prompt, sampling=SamplingParams(max_tokens=60)
    )
    text, pieces, stopping = "", 0, None
    async with caller.gateway.stream(request) as stream:
        async for delta in stream:
            text += delta.text
            pieces += 1
            if pieces == 3:
                mesh.nodes.remove(host)
                stopping = asyncio.ensure_future(host.stop())
    assert text == expected and delta.completion_tokens == 60
    assert "failed after" not in caplog.text  # no failover: the host finished it
    async with asyncio.timeout(30):
        await stopping
