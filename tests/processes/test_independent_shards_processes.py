"""Independent-shard mode across two node processes on loopback, through the OpenAI API: each
node serves its own shard, a session goes to the shard rendezvous hashing picks (from any
node), and that shard answers as the same shard loaded alone would."""

from __future__ import annotations

import asyncio

import openai

from mesh_node.engine import GenerationRequest, Generator
from mesh_node.engine.catalog import BUILTIN_DIR
from mesh_node.engine.loading import LoadPlan
from mesh_node.engine.sampling import SamplingParams
from mesh_node.identity import new_mesh_id
from mesh_node.placement.shards import shard_for_session
from mesh_node.serving.requests import ChatMessage, CompletionRequest
from mesh_node.serving.routing import affinity_key
from tests.processes.nodes import NodeProcess, start_mesh, stop_all

PROMPT = "Reverse the words: blue green red"


async def shard_sections(nodes: list[NodeProcess], timeout: float = 120) -> dict[str, dict]:
    """node id -> its "shards" section, once every node serves its shard of a 2-way split."""
    async with asyncio.timeout(timeout):
        while True:
            documents = {str(n.node_id): await n.status() for n in nodes}
            sections = {
                node: next((s for s in d.get("shards", []) if s["model"] == "builtin"), None)
                for node, d in documents.items()
            }
            ready = [
                e["ready"]
                for d in documents.values()
                for e in d["hosting"]
                if e["model"] == "builtin"
            ]
            if all(s is not None and s["shards"] == len(nodes) for s in sections.values()) and all(
                len(r) == len(nodes) for r in ready
            ):
                return sections
            await asyncio.sleep(0.2)  # polling other processes' status (bounded)


async def test_two_shard_processes_route_each_session_to_its_shard():
    nodes = await start_mesh(new_mesh_id(), 2, "--moe-shards")
    try:
        sections = await shard_sections(nodes)
        assert sorted(s["shard"] for s in sections.values()) == [0, 1]
        assert len({s["plan"] for s in sections.values()}) == 1
        for user in ("alice", "bob", "carol"):
            request = CompletionRequest(
                model="builtin", request_id="-", messages=(ChatMessage("user", PROMPT),), user=user
            )
            chosen = shard_for_session(affinity_key(request).hex(), list(sections))
            experts = {int(k): v for k, v in sections[chosen]["experts"].items()}
            with Generator.from_pretrained(
                str(BUILTIN_DIR), plan=LoadPlan(experts=experts, restrict_router=True)
            ) as alone:
                expected = alone.generate(
                    GenerationRequest(
                        messages=[{"role": "user", "content": PROMPT}],
                        sampling=SamplingParams(max_tokens=32),
                    )
                ).text
            for via in nodes:  # whichever node the client asks, the session's shard answers
                api = openai.AsyncOpenAI(base_url=via.api_url, api_key="-", max_retries=0)
                try:
                    answer = await api.chat.completions.create(
                        model="builtin",
                        messages=[{"role": "user", "content": PROMPT}],
                        temperature=0,
                        max_tokens=32,
                        user=user,
                    )
                finally:
                    await api.close()
                assert answer.choices[0].message.content == expected
    finally:
        await stop_all(nodes)
