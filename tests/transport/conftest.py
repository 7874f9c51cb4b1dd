"""Fixtures: pairs of endpoints over QUIC on loopback and over the in-memory network,
with a registry extended by test-only messages (private range 0xF0xx)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import pytest

from mesh_node.identity import NodeIdentity
from mesh_node.protocol import MESSAGES
from mesh_node.transport.connection import Handlers
from mesh_node.transport.errors import ErrorCode, RequestFailed
from mesh_node.transport.memory import MemoryNetwork
from mesh_node.transport.messages import Ping, Pong
from mesh_node.transport.quic import QuicEndpoint
from mesh_node.transport.schema import Registry
from mesh_node.transport.tensors import Tensor


@dataclass(frozen=True, slots=True)
class Echo:
    text: str


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Fail:
    code: int


@dataclass(frozen=True, slots=True)
class Crash:
    pass


@dataclass(frozen=True, slots=True)
class Count:
    n: int
    size: int = 0


@dataclass(frozen=True, slots=True)
class Item:
    i: int
    pad: bytes = b""


@dataclass(frozen=True, slots=True)
class Scale:
    x: Tensor
    factor: float


@dataclass(frozen=True, slots=True)
class Scaled:
    y: Tensor
    extra: list[Tensor] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Note:
    text: str


@dataclass(frozen=True, slots=True)
class Unhandled:
    pass


TEST_MESSAGES = {
    0xF001: Echo,
    0xF002: Sleep,
    0xF003: Fail,
    0xF004: Crash,
    0xF005: Count,
    0xF006: Item,
    0xF007: Scale,
    0xF008: Scaled,
    0xF009: Note,
    0xF00A: Unhandled,
}
REGISTRY = Registry({**MESSAGES, **TEST_MESSAGES})


class Service:
    """Handlers of the test messages, recording what happened."""

    def __init__(self) -> None:
        self.handlers = Handlers()
        self.notes: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.cancelled: asyncio.Queue[str] = asyncio.Queue()
        self.started: asyncio.Queue[str] = asyncio.Queue()
        self.produced = 0
        self.handlers.on_request(Ping, self.ping)
        self.handlers.on_request(Echo, self.echo)
        self.handlers.on_request(Sleep, self.sleep)
        self.handlers.on_request(Fail, self.fail)
        self.handlers.on_request(Crash, self.crash)
        self.handlers.on_request(Scale, self.scale)
        self.handlers.on_stream(Count, self.count)
        self.handlers.on_message(Note, self.note)

    def ping(self, ctx, msg):  # an inline handler (the others are tasks)
        return Pong(msg.seq)

    async def echo(self, ctx, msg):
        return Echo(msg.text)

    async def sleep(self, ctx, msg):
        self.started.put_nowait("sleep")
        try:
            await asyncio.sleep(msg.seconds)
        except asyncio.CancelledError:
            self.cancelled.put_nowait("sleep")
            raise
        return Echo("slept")

    async def fail(self, ctx, msg):
        raise RequestFailed(ErrorCode(msg.code), "asked to fail", reason="asked")

    async def crash(self, ctx, msg):
        raise ZeroDivisionError("handler bug")

    async def scale(self, ctx, msg):
        x = msg.x.torch()
        return Scaled(Tensor.from_torch(x * msg.factor), [msg.x, Tensor.from_torch(x[:1])])

    async def count(self, ctx, msg):
        pad = bytes(msg.size)
        try:
            for i in range(msg.n):
                self.produced = i + 1
                yield Item(i, pad)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.put_nowait("count")
            raise

    async def note(self, ctx, msg):
        self.notes.put_nowait((ctx.peer.short, msg.text))


class Pair:
    """Two endpoints A (client) and B (server) and A's connection to B."""

    def __init__(self, a, b, service_a, service_b):
        self.a, self.b = a, b
        self.service_a, self.service_b = service_a, service_b
        self.conn = None

    async def connect(self, **kwargs):
        self.conn = await self.a.connect(self.b.address, **kwargs)
        return self.conn


def make_quic(mesh, service, limits=None, identity=None):
    return QuicEndpoint(
        identity or NodeIdentity.generate(),
        mesh,
        registry=REGISTRY,
        handlers=service.handlers,
        host="127.0.0.1",
        port=0,
        limits=limits,
    )


@contextlib.asynccontextmanager
async def quic_pair(mesh, limits=None, mesh_b=None, limits_b=None):
    """Two endpoints; `limits_b`: the second one's, when they differ (default `limits`)."""
    sa, sb = Service(), Service()
    a, b = make_quic(mesh, sa, limits), make_quic(mesh_b or mesh, sb, limits_b or limits)
    await a.start()
    await b.start()
    try:
        yield Pair(a, b, sa, sb)
    finally:
        await a.close()
        await b.close()


@contextlib.asynccontextmanager
async def memory_pair(mesh, limits=None, mesh_b=None):
    net = MemoryNetwork()
    sa, sb = Service(), Service()
    a = net.endpoint(
        NodeIdentity.generate(), mesh, registry=REGISTRY, handlers=sa.handlers, limits=limits
    )
    b = net.endpoint(
        NodeIdentity.generate(),
        mesh_b or mesh,
        registry=REGISTRY,
        handlers=sb.handlers,
        limits=limits,
    )
    await a.start()
    await b.start()
    try:
        pair = Pair(a, b, sa, sb)
        pair.network = net
        yield pair
    finally:
        await a.close()
        await b.close()


@pytest.fixture(params=["quic", "memory"])
def pair_factory(request):
    """Runs a test over both carriers: real QUIC on loopback, and the in-memory network."""
    return quic_pair if request.param == "quic" else memory_pair


async def connected(endpoint, peer, timeout=5.0):
    """The endpoint's connection to `peer`, waiting (bounded) for it to open."""
    conn = endpoint.connection_to(peer)
    if conn is not None:
        return conn
    opened = asyncio.get_running_loop().create_future()

    def on_connected(c):
        if c.peer == peer and not opened.done():
            opened.set_result(c)

    endpoint.on_connected.append(on_connected)
    try:
        async with asyncio.timeout(timeout):
            return await opened
    finally:
        endpoint.on_connected.remove(on_connected)
