"""The application handshake over real QUIC: admission, and every way it must refuse."""

from __future__ import annotations

import asyncio
import logging
import struct
import tracemalloc

import pytest
from aioquic.quic.connection import QuicConnection

from mesh_node.identity import MeshSecret, NodeIdentity, new_mesh_id
from mesh_node.transport import handshake
from mesh_node.transport.errors import ConnectionLost, ErrorCode, HandshakeError
from mesh_node.transport.frames import frame_parts
from mesh_node.transport.messages import Hello, Ping, Pong
from mesh_node.transport.quic import QuicCarrier, QuicEndpoint, self_signed_certificate
from tests.conditions import until
from tests.transport.conftest import REGISTRY, Service, connected, make_quic, quic_pair


class Impostor(NodeIdentity):
    """Claims `victim`'s node id but can only sign with its own key."""

    def __init__(self, victim: NodeIdentity):
        super().__init__(NodeIdentity.generate().private_key)
        self.node_id = victim.node_id


async def assert_still_serving(p):
    conn = await p.a.connect(p.b.address, timeout=5)
    assert await conn.request(Ping(1), timeout=5) == Pong(1)


async def test_successful_handshake_authenticates_both_sides(mesh):
    async with quic_pair(mesh) as p:
        conn = await p.connect(expect=p.b.node_id)
        assert conn.peer == p.b.node_id
        assert conn.observed_address[0] == "127.0.0.1"
        assert conn.peer_software == handshake.SOFTWARE
        server_side = await connected(p.b, p.a.node_id)
        assert server_side.peer == p.a.node_id and not server_side.is_client


async def test_three_endpoints_all_connected(mesh):
    services = [Service() for _ in range(3)]
    eps = [make_quic(mesh, s) for s in services]
    for ep in eps:
        await ep.start()
    try:
        for i, ep in enumerate(eps):
            for j, other in enumerate(eps):
                if i != j:
                    conn = await ep.connect(other.address, expect=other.node_id)
                    assert await conn.request(Ping(i * 10 + j), timeout=5) == Pong(i * 10 + j)
        for ep in eps:
            assert {c.peer for c in ep.connections()} == {o.node_id for o in eps if o is not ep}
    finally:
        for ep in eps:
            await ep.close()


async def test_wrong_mesh_secret_is_rejected_on_both_sides(mesh, caplog):
    other_mesh = MeshSecret(new_mesh_id())
    async with quic_pair(mesh, mesh_b=other_mesh) as p:
        with pytest.raises(HandshakeError) as refused:
            await p.connect(timeout=5)
        assert refused.value.code == ErrorCode.WRONG_MESH
        assert "mesh" in caplog.text
        assert p.b.connections() == [] and p.a.connections() == []
        # the server keeps serving nodes of its own mesh
        c = make_quic(other_mesh, Service())
        await c.start()
        try:
            conn = await c.connect(p.b.address, timeout=5)
            assert await conn.request(Ping(5), timeout=5) == Pong(5)
        finally:
            await c.close()


async def test_forged_node_id_is_rejected(mesh):
    async with quic_pair(mesh) as p:
        victim = NodeIdentity.generate()
        forger = make_quic(mesh, Service(), identity=Impostor(victim))
        await forger.start()
        try:
            with pytest.raises(HandshakeError) as refused:
                await forger.connect(p.b.address, timeout=5)
            assert refused.value.code == ErrorCode.BAD_IDENTITY
        finally:
            await forger.close()
        assert p.b.connection_to(victim.node_id) is None
        await assert_still_serving(p)


async def test_server_claiming_another_key_than_its_certificate_is_rejected(mesh):
    victim = NodeIdentity.generate()
    # the TLS certificate carries the forger's own key; the handshake claims the victim's id
    server = make_quic(mesh, Service(), identity=Impostor(victim))
    await server.start()
    client = make_quic(mesh, Service())
    await client.start()
    try:
        with pytest.raises(HandshakeError) as refused:
            await client.connect(server.address, timeout=5)
        assert refused.value.code == ErrorCode.BAD_IDENTITY
    finally:
        await client.close()
        await server.close()


async def test_expecting_another_node_is_rejected_and_logged_as_news(mesh, caplog):
    """Another node where a known one was (it restarted with a new key): refused, and said at
    INFO on both sides, not WARNING: a mesh retries dead members' addresses for hours."""
    caplog.set_level(logging.INFO, logger="mesh_node.transport")
    async with quic_pair(mesh) as p:
        someone_else = NodeIdentity.generate().node_id
        with pytest.raises(HandshakeError) as refused:
            await p.a.connect(p.b.address, expect=someone_else, timeout=5)
        assert refused.value.code == ErrorCode.BAD_IDENTITY
        await until(lambda: len([r for r in caplog.records if "expected node" in r.message]) == 2)
    said = [r for r in caplog.records if "expected node" in r.message]
    assert {r.levelno for r in said} == {logging.INFO}
    assert {"client side" in r.message for r in said} == {True, False}  # both sides said it
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_connecting_to_ourselves_is_refused(mesh):
    async with quic_pair(mesh) as p:
        with pytest.raises(HandshakeError) as refused:
            await p.a.connect(p.a.address, timeout=5)
        assert refused.value.code == ErrorCode.SELF_CONNECTION


class ScriptedClient:
    """Stands in for a Connection on a raw QUIC client: sends given frames on stream 0
    (one more each time the server answers) and records how the connection ended."""

    def __init__(self, frames: list[bytes], reset: int | None = None):
        self.frames = list(frames)
        self.reset = reset  # then reset stream 0 with this code, after the first frame
        self.carrier = None
        self.terminated = asyncio.get_running_loop().create_future()
        self.received = b""

    def start(self) -> None:
        self._next()
        if self.reset is not None:
            self.carrier.reset(0, self.reset)
            self.carrier.flush()

    def _next(self) -> None:
        if self.frames:
            self.carrier.write(0, self.frames.pop(0))
            self.carrier.flush()

    def stream_data(self, stream_id, data, end) -> None:
        self.received += data
        self._next()

    def stream_reset(self, stream_id, code) -> None:
        pass

    def writable(self) -> None:
        pass

    def connection_terminated(self, code, reason) -> None:
        if not self.terminated.done():
            self.terminated.set_result((code, reason))


async def run_scripted(endpoint, frames: list[bytes], reset: int | None = None):
    loop = asyncio.get_running_loop()
    quic = QuicConnection(configuration=endpoint._configuration(is_client=True))
    script = ScriptedClient(frames, reset)

    def make(carrier):
        script.carrier = carrier
        return script

    transport, carrier = await loop.create_datagram_endpoint(
        lambda: QuicCarrier(quic, make_connection=make, remote=("127.0.0.1", 0)),
        local_addr=("127.0.0.1", 0),
    )
    try:
        carrier.connect(("127.0.0.1", endpoint.port))
        async with asyncio.timeout(15):
            return await script.terminated
    finally:
        transport.close()


async def test_replayed_handshake_is_rejected(mesh, monkeypatch):
    async with quic_pair(mesh) as p:
        sent: list[bytes] = []
        original_write = QuicCarrier.write

        def recording_write(self, stream_id, data, end=False):
            if stream_id == 0 and self.is_client:
                sent.append(bytes(data))
            return original_write(self, stream_id, data, end)

        monkeypatch.setattr(QuicCarrier, "write", recording_write)
        conn = await p.connect()
        monkeypatch.undo()
        assert await conn.request(Ping(1), timeout=5) == Pong(1)
        hello, auth = sent  # one write per frame: the client's Hello, then its Auth
        code, reason = await run_scripted(p.b, [hello, auth])
        assert code == ErrorCode.BAD_IDENTITY, reason
        assert "replayed" in reason
        await assert_still_serving(p)


async def test_version_mismatch_is_rejected(mesh):
    async with quic_pair(mesh) as p:
        ident = NodeIdentity.generate()
        hello = Hello(
            proto_min=handshake.PROTO_MAX + 1,
            proto_max=handshake.PROTO_MAX + 5,
            software="mesh-node/99",
            node_key=ident.node_id.key,
            nonce=b"\x01" * 32,
        )
        frame = b"".join(bytes(x) for x in frame_parts(REGISTRY.encode(hello)))
        code, reason = await run_scripted(p.b, [frame])
        assert code == ErrorCode.VERSION_MISMATCH
        assert "protocol" in reason
        await assert_still_serving(p)


async def test_garbage_handshake_is_rejected(mesh):
    async with quic_pair(mesh) as p:
        code, _ = await run_scripted(p.b, [b"\x00\x00\x00\x05\x00\x00\x00\x00hello"])
        assert code == ErrorCode.HANDSHAKE_FAILED
        await assert_still_serving(p)


async def test_a_reset_handshake_stream_fails_the_handshake_at_once(mesh):
    from mesh_node.transport.connection import Limits

    async with quic_pair(mesh, limits=Limits(handshake_timeout=5)) as p:
        loop = asyncio.get_running_loop()
        started = loop.time()
        code, reason = await run_scripted(p.b, [b"\x00\x00"], reset=ErrorCode.CANCELLED)
        assert code == ErrorCode.HANDSHAKE_FAILED, reason
        assert "reset the handshake stream (CANCELLED)" in reason
        assert loop.time() - started < 4  # not by the handshake timer
        await assert_still_serving(p)


async def test_a_header_before_the_handshake_allocates_nothing_large(mesh):
    """Before a peer is authenticated, 8 bytes claiming a 65 MiB frame cost it nothing:
    handshake frames have small limits, and buffers grow only as bytes arrive."""
    async with quic_pair(mesh) as p:
        tracemalloc.start()
        try:
            code, reason = await run_scripted(p.b, [struct.pack(">II", 1 << 20, 64 << 20)])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert code == ErrorCode.HANDSHAKE_FAILED
        assert "exceeds 4096" in reason
        assert peak < 16 << 20  # the claim was 65 MiB
        await assert_still_serving(p)


async def test_silent_client_hits_the_handshake_timeout(mesh):
    from mesh_node.transport.connection import Limits

    async with quic_pair(mesh, limits=Limits(handshake_timeout=0.5)) as p:
        code, _ = await run_scripted(p.b, [])
        assert code == ErrorCode.HANDSHAKE_TIMEOUT
        await assert_still_serving(p)


async def test_dial_to_nowhere_times_out(mesh):
    async with quic_pair(mesh) as p:
        with pytest.raises(ConnectionLost):
            await p.a.connect(("127.0.0.1", 9), timeout=0.5)


async def test_dialing_a_host_that_could_never_resolve_fails_as_a_lost_connection(mesh):
    endpoint = make_quic(mesh, Service())
    await endpoint.start()
    try:  # a label over 63 characters: refused before any lookup leaves the machine
        with pytest.raises(ConnectionLost, match="cannot resolve"):
            await endpoint.connect(("x" * 64 + ".example", 7300), timeout=5)
    finally:
        await endpoint.close()


class CertificateOfAnotherKey(QuicEndpoint):
    """Signs the handshake validly with its own node key, but serves TLS with a certificate
    (and TLS key) of `tls_identity`: what a relay between a client and a real node shows."""

    def __init__(self, identity: NodeIdentity, tls_identity: NodeIdentity, mesh, service):
        super().__init__(
            identity, mesh, registry=REGISTRY, handlers=service.handlers, host="127.0.0.1", port=0
        )
        self.tls_identity = tls_identity

    def _configuration(self, is_client: bool):
        config = super()._configuration(is_client)
        if not is_client:
            config.certificate = self_signed_certificate(self.tls_identity)
            config.private_key = self.tls_identity.private_key
        return config


async def test_a_valid_handshake_signature_over_another_keys_certificate_is_rejected(mesh):
    """The client binds the handshake to the TLS channel: a server whose HelloAck is signed
    correctly by its node key is still refused when its certificate carries another key."""
    node = NodeIdentity.generate()
    server = CertificateOfAnotherKey(node, NodeIdentity.generate(), mesh, Service())
    await server.start()
    client = make_quic(mesh, Service())
    await client.start()
    try:
        with pytest.raises(HandshakeError, match="TLS certificate") as refused:
            await client.connect(server.address, timeout=5)
        assert refused.value.code == ErrorCode.BAD_IDENTITY
        assert client.connection_to(node.node_id) is None
    finally:
        await client.close()
        await server.close()
