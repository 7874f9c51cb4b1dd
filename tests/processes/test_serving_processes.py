"""Serving across three node processes on loopback, through the official openai client."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import openai
import pytest

from mesh_node.engine import GenerationRequest, Generator
from mesh_node.engine.builtin_skills import held_out_set
from mesh_node.engine.sampling import SamplingParams
from mesh_node.identity import new_mesh_id
from tests.gateway.slow_model import NAME as SLOW
from tests.gateway.slow_model import build_slow_model
from tests.processes.nodes import NodeProcess, start_mesh, stop_all

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    return build_slow_model(tmp_path_factory.mktemp("models"))


async def wait_for_host(nodes: list[NodeProcess], model: str, timeout: float = 60) -> NodeProcess:
    """The node that is ready to serve `model`, as the first node's status shows it."""
    async with asyncio.timeout(timeout):
        while True:
            for entry in (await nodes[0].status()).get("hosting", []):
                if entry["model"] == model and entry["ready"]:
                    ready = entry["ready"][0]
                    return next(n for n in nodes if str(n.node_id) == ready)
            await asyncio.sleep(0.2)  # polling another process's HTTP status (bounded)


def client(node: NodeProcess, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=node.api_url, api_key=key, max_retries=0, timeout=60)


@pytest.fixture(autouse=True)
async def _close_clients(monkeypatch):
    """Every client a test opens is closed before its event loop goes away."""
    opened: list[openai.AsyncOpenAI] = []
    original = openai.AsyncOpenAI

    def tracked(*args, **kwargs):
        api = original(*args, **kwargs)
        opened.append(api)
        return api

    monkeypatch.setattr(openai, "AsyncOpenAI", tracked)
    yield
    for api in opened:
        await api.close()


async def test_openai_client_through_a_node_that_does_not_host():
    nodes = await start_mesh(new_mesh_id(), 3, "--api-key", KEY)
    try:
        host = await wait_for_host(nodes, "builtin")
        other = next(n for n in nodes if n is not host)
        api = client(other)
        models = await api.models.list()
        assert [m.id for m in models.data] == ["builtin"]
        answer = await api.chat.completions.create(
            model="builtin",
            messages=[{"role": "user", "content": "What is 348 + 276?"}],
            temperature=0,
        )
        assert answer.choices[0].message.content == "624"
        assert answer.usage.completion_tokens >= 3
        stream = await api.chat.completions.create(
            model="builtin",
            messages=[{"role": "user", "content": "Sort the letters: d b a c"}],
            temperature=0,
            stream=True,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "a b c d"
        completion = await api.completions.create(
            model="builtin", prompt="Reverse the words: one two", temperature=0, max_tokens=8
        )
        assert completion.choices[0].text  # raw prompt, no chat template: whatever follows
    finally:
        await stop_all(nodes)


async def test_kill_9_of_the_host_mid_stream_and_the_stream_completes_identically(slow_model):
    prompt, tokens = "The mesh keeps going", 300
    with Generator.from_pretrained(str(slow_model)) as alone:
        expected = alone.generate(
            GenerationRequest(prompt=prompt, sampling=SamplingParams(max_tokens=tokens))
        ).text
    nodes = await start_mesh(new_mesh_id(), 3, "--api-key", KEY, "--model", str(slow_model))
    try:
        host = await wait_for_host(nodes, SLOW)
        caller = next(n for n in nodes if n is not host)
        stream = await client(caller).completions.create(
            model=SLOW, prompt=prompt, max_tokens=tokens, temperature=0, stream=True
        )
        text, pieces, finish = "", 0, None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
            pieces += 1
            if pieces == 3:
                await host.kill()  # kill -9, mid-answer
        assert text == expected
        assert finish == "length"
        await caller.wait_log(rf"host {host.node_id.short} failed after \d+ tokens")
    finally:
        await stop_all(nodes)


def answered_correctly(count: int) -> list:
    """Held-out prompts that the built-in model, alone, answers right (it misses a few)."""
    with Generator.from_pretrained() as alone:
        chosen = []
        for example in held_out_set(per_skill=40, seed=9):
            request = GenerationRequest(messages=[{"role": "user", "content": example.prompt}])
            if alone.generate(request).text == example.answer:
                chosen.append(example)
            if len(chosen) == count:
                return chosen
    raise AssertionError("not enough examples")


async def test_fifty_concurrent_requests_spread_over_the_nodes():
    examples = answered_correctly(50)
    nodes = await start_mesh(new_mesh_id(), 3, "--api-key", KEY)
    apis = [client(n) for n in nodes]
    try:
        await wait_for_host(nodes, "builtin")

        async def ask(i, example):
            answer = await apis[i % 3].chat.completions.create(
                model="builtin",
                messages=[{"role": "user", "content": example.prompt}],
                temperature=0,
                user=f"user-{i}",
            )
            return answer.choices[0].message.content

        answers = await asyncio.gather(*(ask(i, e) for i, e in enumerate(examples)))
        assert answers == [e.answer for e in examples]  # none lost, none mixed up, all right
    finally:
        await stop_all(nodes)


async def test_bad_requests_get_the_promised_errors_and_the_node_keeps_serving():
    nodes = await start_mesh(new_mesh_id(), 2, "--api-key", KEY)
    try:
        await wait_for_host(nodes, "builtin")
        url = nodes[1].api_url + "/chat/completions"
        good = {"model": "builtin", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}
        auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        cases = [
            (b"{not json", auth, 400, None),
            (json.dumps({**good, "messages": "hello"}).encode(), auth, 400, "messages"),
            (json.dumps({"model": "builtin"}).encode(), auth, 400, "messages"),
            (json.dumps({**good, "max_tokens": -5}).encode(), auth, 400, "max_tokens"),
            (json.dumps({**good, "max_tokens": 10**12}).encode(), auth, 400, "max_tokens"),
            (json.dumps({**good, "temperature": "hot"}).encode(), auth, 400, "temperature"),
            (json.dumps({**good, "model": "nope"}).encode(), auth, 404, "model"),
            (json.dumps(good).encode(), {**auth, "Authorization": "Bearer wrong"}, 401, None),
            (json.dumps(good).encode(), {"Content-Type": "application/json"}, 401, None),
        ]
        async with aiohttp.ClientSession() as session:
            for body, headers, status, param in cases:
                async with session.post(url, data=body, headers=headers) as response:
                    payload = await response.json()
                    assert response.status == status, (body, payload)
                    assert set(payload["error"]) >= {"message", "type", "param", "code"}
                    if param:
                        assert payload["error"]["param"] == param, payload
        answer = await client(nodes[1]).chat.completions.create(
            model="builtin", messages=good["messages"], temperature=0
        )
        assert answer.choices[0].message.content == "5"
    finally:
        await stop_all(nodes)


async def test_sigterm_of_a_host_fails_over_cleanly():
    nodes = await start_mesh(new_mesh_id(), 3, "--api-key", KEY)
    try:
        host = await wait_for_host(nodes, "builtin")
        host.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            code = await host.proc.wait()
        assert code == 0, "".join(host.stderr_lines[-25:])
        survivors = [n for n in nodes if n is not host]
        answer = await client(survivors[0]).chat.completions.create(
            model="builtin",
            messages=[{"role": "user", "content": "Reverse the words: blue green red"}],
            temperature=0,
        )
        assert answer.choices[0].message.content == "red green blue"
    finally:
        await stop_all(nodes)
