"""Expert calls on express lanes: the host's dispatcher sends them as sealed UDP datagrams to a
peer's expert service (real sockets on loopback, real banks), gets the single node's logits,
and when the lane stops answering makes the same calls over its QUIC path instead."""

from __future__ import annotations

import asyncio
import os
import threading

import torch

from mesh_node.engine.catalog import BUILTIN_DIR
from mesh_node.engine.loading import LoadPlan, load_expert_banks, load_model
from mesh_node.expert_parallel.dispatch import DispatchStats, ExpertRoutes, RemoteExperts
from mesh_node.expert_parallel.lanes import ExpertLanes
from mesh_node.expert_parallel.service import ExpertService
from mesh_node.identity import NodeIdentity
from mesh_node.protocol import REGISTRY
from mesh_node.transport.connection import Handlers
from mesh_node.transport.express import ExpressClient, ExpressServer


def test_calls_go_on_the_lane_and_over_quic_when_it_stops_answering():
    full = load_model(BUILTIN_DIR, device="cpu", dtype="float32")
    trunk = load_model(BUILTIN_DIR, plan=LoadPlan.trunk(), device="cpu", dtype="float32")
    near = load_expert_banks(BUILTIN_DIR, {i: range(0, 8, 2) for i in range(4)}, device="cpu")
    far = load_expert_banks(BUILTIN_DIR, {i: range(1, 8, 2) for i in range(4)}, device="cpu")
    host = NodeIdentity.generate().node_id
    peer = NodeIdentity.generate().node_id
    # the peer: its expert service answering on a lane server
    server = ExpressServer(REGISTRY, host="127.0.0.1")
    service = ExpertService(Handlers(), lanes=server)
    service.replace("builtin", far)
    server.start()
    secret = os.urandom(32)
    lane = server.open_lane(host, "connection", secret)
    # the host: lanes to the peer, and a "QUIC" path that counts what it is asked
    lanes = ExpertLanes("builtin", ExpressClient(REGISTRY, attempts=2, first_rto=0.05))
    lanes.add(peer, "connection", ("127.0.0.1", server.port), lane, secret)
    over_quic = []

    async def call(node, layer, experts, counts, rows, token_of, weights):
        over_quic.append(layer)
        return far[layer].run_weighted(rows.clone(), experts, counts, token_of, weights)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    routes = ExpertRoutes()
    routes.update({(layer, e): (peer,) for layer in range(4) for e in range(1, 8, 2)})
    stats = DispatchStats()
    for layer in trunk.moe_layers():
        layer.experts = RemoteExperts(
            layer.layer, lambda i=layer.layer: near[i], routes, call, loop, stats, lanes=lanes
        )

    def forward(model):
        ids = torch.tensor([[3, 17, 42, 99, 5, 250, 7, 8]])
        positions = torch.arange(ids.shape[1])[None]
        with torch.inference_mode():
            return model(ids, positions, model.new_cache(1, 16), slot_start=0, kv_len=8)

    try:
        want = forward(full)
        assert (forward(trunk) - want).abs().max().item() < 1e-3
        assert stats.remote_calls == 4 and lanes.calls == 4 and not over_quic
        assert service.calls_served == 4
        server.close()  # the peer's lanes stop answering
        assert (forward(trunk) - want).abs().max().item() < 1e-3
        assert over_quic == [0, 1, 2, 3]  # each call made again over QUIC
        assert lanes.fallbacks == 1  # the first unanswered call dropped the lane
        assert peer not in lanes.client and lanes.calls == 5
        assert not lanes.wants(peer)  # and no new lane is asked for a while
    finally:
        lanes.close()
        server.close()
        service.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
