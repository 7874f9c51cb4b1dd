"""Expert parallelism across three node processes on loopback (real QUIC), through the
OpenAI API: each node holds a share of a MoE model's experts, the answers equal one node
holding everything, and `kill -9` of an expert holder mid-answer changes nothing."""

from __future__ import annotations

import asyncio

import openai
import pytest

from mesh_node.engine import GenerationRequest, Generator
from mesh_node.engine.sampling import SamplingParams
from mesh_node.identity import new_mesh_id
from tests.gateway.slow_moe_model import NAME as SLOW_MOE
from tests.gateway.slow_moe_model import build_slow_moe_model
from tests.processes.nodes import NodeProcess, start_mesh, stop_all

PROMPTS = ["What is 348 + 276?", "Reverse the words: blue green red", "Sort the letters: d b a c"]


@pytest.fixture(scope="module")
def slow_moe(tmp_path_factory):
    return build_slow_moe_model(tmp_path_factory.mktemp("models"))


async def wait_until_served(nodes: list[NodeProcess], model: str, timeout: float = 90):
    """The host, once every node's status shows it ready and the same expert plan."""
    async with asyncio.timeout(timeout):
        while True:
            documents = [await n.status() for n in nodes]
            ready = [
                e["ready"] for d in documents for e in d.get("hosting", []) if e["model"] == model
            ]
            plans = [
                next((e.get("fingerprint") for e in d["experts"] if e["model"] == model), None)
                for d in documents
            ]
            if (
                all(ready)
                and len(ready) == len(nodes)
                and None not in plans
                and len(set(plans)) == 1
            ):
                host = ready[0][0]
                return next(n for n in nodes if str(n.node_id) == host), documents
            await asyncio.sleep(0.2)  # polling other processes' HTTP status (bounded)


async def wait_until_held(nodes: list[NodeProcess], model: str, timeout: float = 60) -> list:
    """Until each node holds exactly its part of the plan (published shards == plan bytes)."""
    async with asyncio.timeout(timeout):
        while True:
            documents = [await n.status() for n in nodes]
            sections = [
                next((e for e in d["experts"] if e["model"] == model), {}) for d in documents
            ]
            if all(_held_as_planned(s) for s in sections):
                return sections
            await asyncio.sleep(0.2)


def _held_as_planned(section: dict) -> bool:
    planned = {entry["node_id"]: entry["bytes"] for entry in section.get("nodes", [])}
    held = section.get("held", {})
    return bool(planned) and all(held.get(node, 0) == b for node, b in planned.items() if b)


def client(node: NodeProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=node.api_url, api_key="-", max_retries=0, timeout=90)


async def test_three_processes_split_the_builtin_model_and_answer_like_one_node():
    with Generator.from_pretrained(None, device="cpu") as alone:
        expected = [
            alone.generate(
                GenerationRequest(
                    messages=[{"role": "user", "content": p}],
                    sampling=SamplingParams(max_tokens=32),
                )
            ).text
            for p in PROMPTS
        ]
    nodes = await start_mesh(new_mesh_id(), 3, "--moe-split", "--expert-memory", "6MiB")
    try:
        host, _ = await wait_until_served(nodes, "builtin")
        sections = await wait_until_held(nodes, "builtin")
        plan = sections[0]
        # every node holds a share, none all 32 experts
        counts = [entry["count"] for entry in plan["nodes"]]
        assert len(counts) == 3 and all(0 < c < 32 for c in counts), plan
        # they gossip one machine label, so each layer's experts held once are on the host or
        # one peer (whole layer parts: a token calls one peer per layer at most)
        holders: dict[tuple[str, int], list[str]] = {}
        for entry in plan["nodes"]:
            for layer, experts in entry["experts"].items():
                for expert in experts:
                    holders.setdefault((layer, expert), []).append(entry["node_id"])
        host_id = next(entry["node_id"] for entry in plan["nodes"] if entry["host"])
        for layer in {layer for layer, _ in holders}:
            peers = {
                nodes[0]
                for (at, _), nodes in holders.items()
                if at == layer and len(nodes) == 1 and nodes[0] != host_id
            }
            assert len(peers) <= 1, (layer, plan)
        # its two expert peers share this machine's cores: the host's decode takes its share
        await host.wait_log(r"builtin: 2 expert peer\(s\) on this machine: decode on \d+ intra")
        # and each peer computes its decode-sized calls on its share
        for peer in (n for n in nodes if n is not host):
            await peer.wait_log(
                r"builtin: 2 other node\(s\) of its expert plan on this machine: "
                r"decode-sized expert calls on \d+ intra-op"
            )
        other = next(n for n in nodes if n is not host)
        api = client(other)
        try:
            for prompt, want in zip(PROMPTS, expected, strict=True):
                answer = await api.chat.completions.create(
                    model="builtin",
                    messages=[{"role": "user", "content": prompt}],
                    temperature=0,
                    max_tokens=32,
                )
                assert answer.choices[0].message.content == want
        finally:
            await api.close()
        # the decode steps' calls went on express lanes (sealed UDP datagrams), not over QUIC
        status = await host.status()
        dispatch = next(e for e in status["experts"] if e["model"] == "builtin")["dispatch"]
        assert dispatch["lanes"] >= 1 and dispatch["lane_calls"] > 0, dispatch
        assert dispatch["lane_calls"] <= dispatch["remote_calls"], dispatch
    finally:
        await stop_all(nodes)


async def test_kill_9_of_an_expert_holder_mid_answer_and_the_answer_is_unchanged(slow_moe):
    prompt, tokens = "The experts keep going", 200
    with Generator.from_pretrained(str(slow_moe), device="cpu") as alone:
        expected = alone.generate(
            GenerationRequest(prompt=prompt, sampling=SamplingParams(max_tokens=tokens))
        ).text
    nodes = await start_mesh(
        new_mesh_id(), 3, "--model", str(slow_moe), "--moe-split", "--expert-memory", "40MiB"
    )
    try:
        host, _ = await wait_until_served(nodes, SLOW_MOE)
        await wait_until_held(nodes, SLOW_MOE)
        victim = next(n for n in nodes if n is not host)
        api = client(host)
        try:
            stream = await api.completions.create(
                model=SLOW_MOE, prompt=prompt, max_tokens=tokens, temperature=0, stream=True
            )
            text, pieces, finish = "", 0, None
            async for chunk in stream:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
                pieces += 1
                if pieces == 5:
                    await victim.kill()  # kill -9 of a node holding experts, mid-answer
        finally:
            await api.close()
            for node in nodes:
                print(f"--- {node.node_id.short}{' (host)' if node is host else ''}")
                print("".join(node.stderr_lines[-40:]))
        assert text == expected
        assert finish == "length"
        survivors = [n for n in nodes if n is not victim]
        # the plan is recomputed without the dead node, and the survivors hold all of it
        sections = await wait_until_held(survivors, SLOW_MOE)
        assert str(victim.node_id) not in [entry["node_id"] for entry in sections[0]["nodes"]]
    finally:
        await stop_all(nodes)
