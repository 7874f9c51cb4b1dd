"""The QUIC listener against strangers (see QuicListener): a first Initial is answered with a
Retry, not a connection; handshakes in progress are bounded per source address and in all,
so one flooding host cannot spend the node's CPU on TLS while real peers still get in."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from mesh_node.transport.connection import Limits
from mesh_node.transport.handshake import ALPN
from mesh_node.transport.quic import QuicListener
from tests.conditions import until
from tests.transport.conftest import Echo, quic_pair


class Stranger:
    """A QUIC client from `source` (a loopback address of its own) that gets through the Retry
    and TLS but never starts the mesh handshake: what a flooding host holds a slot with."""

    def __init__(self, source: str, server: tuple[str, int]):
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source, 0))
        self.sock.setblocking(False)
        config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
        config.verify_mode, config.server_name = ssl.CERT_NONE, "mesh-node"
        self.quic = QuicConnection(configuration=config)
        self.received: list[bytes] = []
        self.tls_done = False

    def _send(self, now: float) -> None:
        for data, addr in self.quic.datagrams_to_send(now=now):
            self.sock.sendto(data, addr)

    async def run(self, seconds: float) -> None:
        """Talk for `seconds` (bounded), answering whatever comes."""
        loop = asyncio.get_running_loop()
        self.quic.connect(self.server, now=loop.time())
        self._send(loop.time())
        end = loop.time() + seconds
        while loop.time() < end:
            try:
                async with asyncio.timeout(min(0.05, end - loop.time())):
                    data = await loop.sock_recv(self.sock, 65536)
            except TimeoutError:
                timer = self.quic.get_timer()
                if timer is not None and timer <= loop.time():
                    self.quic.handle_timer(now=loop.time())
                self._send(loop.time())
                continue
            self.received.append(data)
            self.quic.receive_datagram(data, self.server, now=loop.time())
            while (event := self.quic.next_event()) is not None:
                if isinstance(event, events.HandshakeCompleted):
                    self.tls_done = True
            self._send(loop.time())

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def strangers(count: int, source: str, server: tuple[str, int]):
    group = [Stranger(source, server) for _ in range(count)]
    try:
        yield group
    finally:
        for stranger in group:
            stranger.close()


def listener_of(endpoint) -> QuicListener:
    return endpoint._server


async def test_a_first_initial_gets_a_small_retry_and_builds_no_connection(mesh):
    async with quic_pair(mesh) as p:
        server = ("127.0.0.1", p.b.port)
        with strangers(1, "127.0.0.2", server) as (stranger,):
            loop = asyncio.get_running_loop()
            stranger.quic.connect(server, now=loop.time())
            initial = stranger.quic.datagrams_to_send(now=loop.time())[0][0]
            stranger.sock.sendto(initial, server)  # then nothing more: a spoofed source
            async with asyncio.timeout(5):
                answer = await loop.sock_recv(stranger.sock, 65536)
            header = pull_quic_header(Buffer(data=answer), host_cid_length=8)
            assert header.packet_type == QuicPacketType.RETRY and header.token
            assert len(answer) < len(initial) / 3  # no amplification towards a victim
            # (the Retry was the listener's whole handling of that datagram)
            assert not listener_of(p.b)._protocols and not listener_of(p.b)._unproven


async def test_handshakes_from_one_address_are_bounded_and_others_still_get_in(mesh, monkeypatch):
    monkeypatch.setattr(QuicListener, "max_handshakes_per_address", 3)
    async with quic_pair(mesh, limits=Limits(handshake_timeout=1.5)) as p:
        listener = listener_of(p.b)
        with strangers(5, "127.0.0.2", ("127.0.0.1", p.b.port)) as group:
            await asyncio.gather(*(stranger.run(1.0) for stranger in group))
            assert sum(stranger.tls_done for stranger in group) == 3
            assert listener.refused >= 2 and len(listener._unproven) == 3
            # a real peer from another address is not held up by them
            conn = await p.connect(timeout=5)
            assert await conn.request(Echo("in"), timeout=5) == Echo("in")
            # the strangers' handshakes time out and free their slots for newcomers
            await until(
                lambda: not any(c.connection.authenticating for c in listener._unproven), timeout=5
            )
        with strangers(1, "127.0.0.2", ("127.0.0.1", p.b.port)) as (late,):
            await late.run(1.0)
            assert late.tls_done


async def test_handshakes_in_progress_are_bounded_in_all(mesh, monkeypatch):
    monkeypatch.setattr(QuicListener, "max_handshakes", 4)
    async with quic_pair(mesh, limits=Limits(handshake_timeout=5.0)) as p:
        server = ("127.0.0.1", p.b.port)
        with strangers(3, "127.0.0.2", server) as one, strangers(3, "127.0.0.3", server) as two:
            await asyncio.gather(*(stranger.run(1.0) for stranger in one + two))
            assert sum(stranger.tls_done for stranger in one + two) == 4
            assert len(listener_of(p.b)._unproven) == 4 and listener_of(p.b).refused >= 2
