"""Expert calls on express lanes: the host's dispatcher sends them as sealed UDP datagrams to a
peer's expert service (real sockets on loopback, real banks), gets the single node's logits,
and when the lane stops answering makes the same calls over its QUIC path instead."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from types import SimpleNamespace

import pytest
import torch

from mesh_node.engine.catalog import BUILTIN_DIR
from mesh_node.engine.loading import LoadPlan, load_expert_banks, load_model
from mesh_node.expert_parallel.coordinator import ExpertParallel
from mesh_node.expert_parallel.dispatch import DispatchStats, ExpertRoutes, RemoteExperts
from mesh_node.expert_parallel.lanes import ExpertLanes
from mesh_node.expert_parallel.service import ExpertService
from mesh_node.identity import MeshSecret, NodeIdentity, new_mesh_id
from mesh_node.protocol import REGISTRY
from mesh_node.transport.connection import Handlers
from mesh_node.transport.express import ExpressClient, ExpressServer
from mesh_node.transport.messages import ExpressLane, ExpressOpen, Ping, Pong
from mesh_node.transport.quic import QuicEndpoint


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


class _Started:
    """A call handle that records what became of it."""

    def __init__(self):
        self.cancelled = False

    def result(self, timeout):
        raise AssertionError("not waited for: the step failed before")

    def cancel(self):
        self.cancelled = True
        return True


class _Lanes:
    def __init__(self):
        self.started: list[_Started] = []

    def start(self, peer, layer, experts, counts, rows, token_of, weights):
        self.started.append(_Started())
        return self.started[-1]


class _FailingBank:
    """The host's own experts of a layer, failing while the remote calls are in flight."""

    def holds(self, expert):
        return expert == 2

    def run_weighted(self, *args):
        raise RuntimeError("the host's own experts failed")


def test_a_step_that_fails_leaves_no_call_it_started_behind():
    peer = NodeIdentity.generate().node_id
    routes = ExpertRoutes()
    routes.update({(0, 1): (peer,)})
    lanes = _Lanes()
    loop = asyncio.new_event_loop()  # never run: no call may go over "QUIC" here
    try:
        experts = RemoteExperts(0, _FailingBank, routes, None, loop, DispatchStats(), lanes=lanes)
        x, chosen, weights = torch.randn(1, 128), torch.tensor([[1, 2]]), torch.rand(1, 2)
        with pytest.raises(RuntimeError, match="own experts failed"):
            experts.run_combined(x, chosen, weights)
    finally:
        loop.close()
    assert len(lanes.started) == 1 and lanes.started[0].cancelled


def test_a_late_failure_on_an_old_lane_keeps_the_lane_opened_since():
    peer = NodeIdentity.generate().node_id
    lanes = ExpertLanes("builtin", ExpressClient(REGISTRY))
    try:
        lanes.add(peer, "old connection", ("127.0.0.1", 9), b"old-lane", os.urandom(32))
        lanes.add(peer, "new connection", ("127.0.0.1", 9), b"new-lane", os.urandom(32))
        lanes.failed(peer, b"old-lane")  # a call made on the old lane went unanswered
        assert lanes.client.lane_id(peer) == b"new-lane" and not lanes.wants(peer)
        lanes.failed(peer, b"new-lane")
        assert peer not in lanes.client and not lanes.wants(peer)  # dropped, none for a while
    finally:
        lanes.client.close()


class _Granting:
    """A connection on which the peer grants a lane: grant(secret) -> (lane id, port)."""

    def __init__(self, grant):
        self.remote_address = ("127.0.0.1", 7300)
        self.remote_ip = "127.0.0.1"
        self.is_open = True
        self._grant = grant

    async def request(self, message, timeout):
        assert isinstance(message, ExpressOpen)
        return ExpressLane(*self._grant(message.secret))


async def test_a_granted_lane_is_used_only_once_it_answered_a_probe():
    owner = SimpleNamespace(
        config=SimpleNamespace(connect_timeout=0.3), endpoint=SimpleNamespace(registry=REGISTRY)
    )
    peer = NodeIdentity.generate().node_id
    # a lane whose port answers nothing (a firewall drops it): never used, asked again later
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    lanes = ExpertLanes("builtin", ExpressClient(REGISTRY), retry_after=30.0)
    try:
        assert lanes.wants(peer)
        conn = _Granting(lambda secret: (b"12345678", silent.getsockname()[1]))
        await ExpertParallel._open_lane(owner, lanes, peer, conn)
        assert peer not in lanes.client and not lanes.wants(peer)
    finally:
        silent.close()
        lanes.client.close()
    # a lane that answers: used, its numbering going on from the probe's Ping
    server = ExpressServer(REGISTRY, host="127.0.0.1")
    server.on_call(Ping, lambda node, msg: Pong(msg.seq))
    server.start()
    lanes = ExpertLanes("builtin", ExpressClient(REGISTRY))
    try:
        assert lanes.wants(peer)
        granted = []

        def grant(secret):
            granted.append(server.open_lane(peer, "connection", secret))
            return granted[-1], server.port

        await ExpertParallel._open_lane(owner, lanes, peer, _Granting(grant))
        assert lanes.client.lane_id(peer) == granted[0]
        call = lanes.client.call(peer, Ping(5))
        assert lanes.client.result(call, 2.0) == Pong(5) and call.lane.sent == 2
    finally:
        lanes.client.close()
        server.close()


async def test_a_lane_whose_connection_closed_during_its_probe_is_not_used():
    """The peer forgets a lane with the connection that granted it: one that closed while
    the probe was out leaves no lane (and a later call may open a new one)."""
    owner = SimpleNamespace(
        config=SimpleNamespace(connect_timeout=2.0), endpoint=SimpleNamespace(registry=REGISTRY)
    )
    peer = NodeIdentity.generate().node_id
    server = ExpressServer(REGISTRY, host="127.0.0.1")
    server.on_call(Ping, lambda node, msg: Pong(msg.seq))
    server.start()
    lanes = ExpertLanes("builtin", ExpressClient(REGISTRY))
    try:
        assert lanes.wants(peer)

        def grant(secret):
            lane = server.open_lane(peer, "connection", secret)
            conn.is_open = False  # closes while the lane is being probed
            return lane, server.port

        conn = _Granting(grant)
        await ExpertParallel._open_lane(owner, lanes, peer, conn)
        assert peer not in lanes.client and lanes.status()["lanes"] == 0
        assert lanes.wants(peer)
    finally:
        lanes.client.close()
        server.close()


def test_a_lane_added_after_its_lanes_closed_opens_no_socket():
    """A probe that finishes after the model stopped being hosted (its lanes closed) keeps
    nothing: no lane, and no UDP socket left open."""
    peer = NodeIdentity.generate().node_id
    lanes = ExpertLanes("builtin", ExpressClient(REGISTRY))
    assert lanes.wants(peer)
    lanes.close()
    assert not lanes.wants(NodeIdentity.generate().node_id)  # and asks for no more lanes
    assert not lanes.add(peer, "connection", ("127.0.0.1", 9), os.urandom(8), os.urandom(32))
    assert not lanes.client._sockets and peer not in lanes.client
    assert lanes.status()["lanes"] == 0


def test_peers_held_off_are_remembered_within_a_bound():
    from mesh_node.expert_parallel.lanes import MAX_HELD_OFF

    lanes = ExpertLanes("builtin", ExpressClient(REGISTRY))
    try:
        peers = [NodeIdentity.generate().node_id for _ in range(MAX_HELD_OFF + 50)]
        for peer in peers:
            lanes.refused(peer)  # "never": such holds never pass on their own
        assert len(lanes._not_before) == MAX_HELD_OFF
        assert peers[-1] in lanes._not_before and peers[0] not in lanes._not_before
    finally:
        lanes.close()


async def test_a_lane_to_a_peer_dialed_by_name_goes_to_the_address_the_name_resolved_to():
    """A host whose connection to a peer was dialed by name (`--peer node-a:7300`, as in
    docker-compose.yml) gets a lane to it (it took the name for the lane's address, which a
    lane cannot resolve: no lane to that peer, ever, and only a line at info level)."""
    mesh = MeshSecret(new_mesh_id())
    peer = QuicEndpoint(
        NodeIdentity.generate(), mesh, registry=REGISTRY, handlers=Handlers(), host="::", port=0
    )
    server = ExpressServer(REGISTRY, host="::")  # (whichever address localhost names)
    server.on_call(Ping, lambda node, msg: Pong(msg.seq))
    server.attach(peer)
    host = QuicEndpoint(
        NodeIdentity.generate(),
        mesh,
        registry=REGISTRY,
        handlers=Handlers(),
        host="127.0.0.1",
        port=0,
    )
    owner = SimpleNamespace(config=SimpleNamespace(connect_timeout=2.0), endpoint=host)
    lanes = ExpertLanes("builtin", ExpressClient(REGISTRY))
    await peer.start()
    server.start()
    await host.start()
    try:
        conn = await host.connect(("localhost", peer.port), expect=peer.node_id, timeout=5)
        assert conn.remote_address == ("localhost", peer.port)
        await ExpertParallel._open_lane(owner, lanes, peer.node_id, conn)
        assert peer.node_id in lanes.client
        call = lanes.client.call(peer.node_id, Ping(7))
        assert await asyncio.to_thread(lanes.client.result, call, 2.0) == Pong(7)
    finally:
        lanes.client.close()
        await host.close()
        server.close()
        await peer.close()
