"""Endpoint: a node's side of the network, whatever carries it (QUIC, or the in-memory
network of tests and simulations). Keeps the authenticated connections by peer, reuses
them, deduplicates concurrent dials, and tells subscribers when peers come and go."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from mesh_node.identity import MeshSecret, NodeId, NodeIdentity
from mesh_node.transport.connection import Carrier, Connection, Handlers, Limits
from mesh_node.transport.errors import ConnectionLost, ErrorCode
from mesh_node.transport.schema import Registry

Address = tuple[str, int]
MAX_DIALS = 256  # dials in progress at once (a peer can name addresses for this node to dial)
MAX_PER_PEER = 4  # open connections with one peer: every per-connection bound multiplies by it


class Endpoint:
    """Base class. Subclasses implement `start()`, `_dial()` and `_shutdown()`."""

    def __init__(
        self,
        identity: NodeIdentity,
        mesh: MeshSecret,
        *,
        registry: Registry,
        handlers: Handlers,
        host: str,
        port: int,
        limits: Limits | None = None,
    ):
        self.identity = identity
        self.mesh = mesh
        self.registry = registry
        self.handlers = handlers
        self.host = host
        self.port = port
        self.limits = limits or Limits()
        self._by_peer: dict[NodeId, list[Connection]] = {}
        self._by_address: dict[Address, Connection] = {}  # connections we dialed, by address
        self._all: set[Connection] = set()
        self._dials: dict[tuple[Address, NodeId | None], asyncio.Future[Connection]] = {}
        self._closing = False
        self.on_connected: list[Callable[[Connection], None]] = []
        self.on_disconnected: list[Callable[[Connection], None]] = []

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    async def start(self) -> None:
        raise NotImplementedError

    async def _dial(
        self, host: str, port: int, expect: NodeId | None, timeout: float
    ) -> Connection:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        raise NotImplementedError

    def normalize_host(self, host: str) -> str:
        return host

    def new_connection(self, carrier: Carrier, expect: NodeId | None = None) -> Connection:
        """Build the Connection for a carrier (inbound or dialed) of this endpoint."""
        return Connection(
            carrier,
            identity=self.identity,
            mesh=self.mesh,
            registry=self.registry,
            handlers=self.handlers,
            limits=self.limits,
            expect=expect,
            on_open=self._opened,
            on_close=self._closed,
        )

    def connection_to(self, peer: NodeId) -> Connection | None:
        """An open connection to `peer`, if any (the newest)."""
        for conn in reversed(self._by_peer.get(peer, ())):
            if conn.is_open:
                return conn
        return None

    def connections(self) -> list[Connection]:
        return [conn for conn in self._all if conn.is_open]

    async def connect(
        self, address: Address, *, expect: NodeId | None = None, timeout: float = 10.0
    ) -> Connection:
        """An open connection to the node at `address`: reused when one exists, dialed and
        authenticated otherwise (so a lost connection is re-established on next use).
        With `expect`, the peer must be that node."""
        if self._closing:
            raise ConnectionLost("endpoint is shutting down")
        if expect is not None:
            existing = self.connection_to(expect)
            if existing is not None:
                return existing
        host, port = self.normalize_host(address[0]), int(address[1])
        dialed = self._by_address.get((host, port))
        if dialed is not None and dialed.is_open and (expect is None or dialed.peer == expect):
            return dialed
        key = ((host, port), expect)
        dial = self._dials.get(key)
        if dial is None and len(self._dials) >= MAX_DIALS:
            raise ConnectionLost(f"cannot dial {host}:{port}: {MAX_DIALS} dials in progress")
        if dial is None:
            dial = asyncio.ensure_future(self._dial(host, port, expect, timeout))
            self._dials[key] = dial
            dial.add_done_callback(lambda d: self._dial_done(key, d))
        return await asyncio.shield(dial)

    def _dial_done(self, key: Any, dial: asyncio.Future[Connection]) -> None:
        self._dials.pop(key, None)
        if not dial.cancelled():
            dial.exception()  # retrieved here: callers that gave up must not cause a warning

    async def _await_open(self, conn: Connection, where: str, timeout: float) -> Connection:
        """Wait for a dialed connection's handshake, closing it on timeout."""
        self._all.add(conn)
        try:
            async with asyncio.timeout(timeout):
                await conn.wait_open()
        except TimeoutError:
            conn.close(ErrorCode.HANDSHAKE_TIMEOUT, "dial timed out")
            raise ConnectionLost(f"no answer from {where} within {timeout:g}s") from None
        finally:
            if not conn.is_open:
                self._all.discard(conn)
        return conn

    def _opened(self, conn: Connection) -> None:
        assert conn.peer is not None
        self._all.add(conn)
        if self._closing:
            conn.close(ErrorCode.SHUTTING_DOWN, "shutting down")
            return
        links = self._by_peer.setdefault(conn.peer, [])
        links.append(conn)
        excess = len(links) - MAX_PER_PEER
        if excess > 0:  # the oldest idle ones go first, then the oldest
            older = sorted(links[:-1], key=lambda c: c.busy)  # (stable: oldest first)
            for old in older[:excess]:
                old.close(
                    ErrorCode.NO_ERROR, f"more than {MAX_PER_PEER} connections with this peer"
                )
        if conn.is_client:
            self._by_address[conn.remote_address] = conn
        for callback in self.on_connected:
            callback(conn)

    def _closed(self, conn: Connection) -> None:
        self._all.discard(conn)
        if self._by_address.get(conn.remote_address) is conn:
            del self._by_address[conn.remote_address]
        if conn.peer is not None:
            links = self._by_peer.get(conn.peer, [])
            if conn in links:
                links.remove(conn)
            if not links:
                self._by_peer.pop(conn.peer, None)
        for callback in self.on_disconnected:
            callback(conn)

    def close_peer(self, peer: NodeId, reason: str) -> None:
        """Close every connection to `peer` (e.g. it was declared dead, or came back as a
        new process: what we hold goes to the old one)."""
        for conn in list(self._by_peer.get(peer, ())):
            conn.close(ErrorCode.NO_ERROR, reason)

    async def close(self) -> None:
        """Close every connection (peers see a clean NO_ERROR close), then the listener."""
        self._closing = True
        for dial in list(self._dials.values()):
            dial.cancel()
        for conn in list(self._all):
            conn.close(ErrorCode.NO_ERROR, "node shutting down")
        await self._shutdown()
