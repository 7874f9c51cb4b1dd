"""A QUIC endpoint in a process of its own, for the network-namespace test of datagram sizes.

python -m tests.transport.datagram_peer serve HOST MESH_ID
    prints {"port", "id"}, then for each connection {"server_datagram_size"}; grants express
    lanes that answer Echo (the text twice); stops when stdin closes
python -m tests.transport.datagram_peer dial HOST PORT ID MESH_ID
    sends a 1 MiB tensor, then an 8000-character Echo on an express lane (a 16 KB answer:
    IP fragments it), and prints {"client_datagram_size", "echoed", "lane_echoed"}
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import torch

from mesh_node.identity import MeshSecret, NodeId, NodeIdentity
from mesh_node.transport.express import ExpressClient, ExpressServer
from mesh_node.transport.messages import ExpressOpen
from mesh_node.transport.quic import QuicEndpoint
from mesh_node.transport.tensors import Tensor
from tests.transport.conftest import REGISTRY, Echo, Scale, Service


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def serve(host: str, mesh_id: str) -> None:
    endpoint = QuicEndpoint(
        NodeIdentity.generate(),
        MeshSecret(mesh_id),
        registry=REGISTRY,
        handlers=Service().handlers,
        host=host,
        port=0,
    )
    endpoint.on_connected.append(lambda conn: say(server_datagram_size=conn._carrier.datagram_size))
    lanes = ExpressServer(REGISTRY, host=host)
    lanes.on_call(Echo, lambda peer, msg: Echo(msg.text * 2))
    lanes.attach(endpoint)
    await endpoint.start()
    lanes.start()
    say(port=endpoint.port, id=str(endpoint.node_id))
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    lanes.close()
    await endpoint.close()


async def dial(host: str, port: str, node_id: str, mesh_id: str) -> None:
    endpoint = QuicEndpoint(
        NodeIdentity.generate(),
        MeshSecret(mesh_id),
        registry=REGISTRY,
        handlers=Service().handlers,
        host="0.0.0.0",
        port=0,
    )
    await endpoint.start()
    try:
        conn = await endpoint.connect((host, int(port)), expect=NodeId.parse(node_id), timeout=10)
        x = torch.arange(256 * 1024, dtype=torch.float32)  # 1 MiB
        reply = await conn.request(Scale(Tensor.from_torch(x), 1.0), timeout=30)
        secret = os.urandom(32)
        grant = await conn.request(ExpressOpen(secret), timeout=10)
        lanes = ExpressClient(REGISTRY)
        lanes.add("server", (host, grant.port), grant.lane, secret)
        text = "lane" * 2000
        try:  # blocking, as an engine thread calls
            answer = await asyncio.to_thread(
                lambda: lanes.result(lanes.call("server", Echo(text)), 10.0)
            )
        finally:
            lanes.close()
        say(
            client_datagram_size=conn._carrier.datagram_size,
            echoed=torch.equal(reply.extra[0].torch(), x),
            lane_echoed=answer == Echo(text * 2) and lanes.resent == 0,
        )
    finally:
        await endpoint.close()


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    asyncio.run(serve(*args) if command == "serve" else dial(*args))
