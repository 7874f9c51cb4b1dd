"""A mesh of real nodes in one process over the in-memory network, for serving tests."""

from __future__ import annotations

import asyncio
import contextlib
import random

from mesh_node.engine.sampling import SamplingParams
from mesh_node.identity import MeshSecret, NodeIdentity
from mesh_node.node import Node, NodeConfig
from mesh_node.protocol import REGISTRY
from mesh_node.serving.requests import ChatMessage, CompletionRequest
from mesh_node.transport.connection import Handlers
from mesh_node.transport.memory import MemoryNetwork


class Mesh:
    def __init__(self, network: MemoryNetwork, mesh_id: str):
        self.network = network
        self.mesh_id = mesh_id
        self.nodes: list[Node] = []
        self.changed = asyncio.Event()  # any node's view changed

    async def add(self, models=(), client=False, identity=None, **options) -> Node:
        identity = identity or NodeIdentity.generate()
        endpoint = self.network.endpoint(
            identity, MeshSecret(self.mesh_id), registry=REGISTRY, handlers=Handlers()
        )
        peers = (self.nodes[0].endpoint.address,) if self.nodes else ()
        options = {"console_port": None, "api_port": None, **options}  # e.g. console_port=0
        config = NodeConfig(
            mesh_id=self.mesh_id,
            models=tuple(models),
            client=client,
            peers=peers,
            mdns=False,
            **options,
        )
        node = Node(config, endpoint=endpoint)
        await node.start()
        node.membership.table.subscribe(lambda member, what: self.changed.set())
        self.nodes.append(node)
        return node

    async def stop(self) -> None:
        for node in self.nodes:
            await node.stop()

    async def wait(self, predicate, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                # elections and loads also change without a table event: look again soon
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.1)

    def hosts_of(self, model: str) -> list[Node]:
        return [n for n in self.nodes if model in n.local.generators]


def chat(model: str, text: str, max_tokens: int = 32, user: str | None = None):
    return CompletionRequest(
        model=model,
        request_id=f"t-{random.random()}",
        messages=(ChatMessage("user", text),),
        sampling=SamplingParams(max_tokens=max_tokens),
        user=user,
    )


async def answer(node: Node, request: CompletionRequest) -> tuple[str, list]:
    text, deltas = "", []
    async with node.gateway.stream(request) as stream:
        async for delta in stream:
            text += delta.text
            deltas.append(delta)
    return text, deltas
