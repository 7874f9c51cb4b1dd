"""Composition root: builds a node's parts from its config and owns their lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mesh_node.identity import MeshSecret, NodeIdentity, default_home
from mesh_node.protocol import REGISTRY
from mesh_node.transport.connection import Handlers, RequestContext
from mesh_node.transport.endpoint import Address, Endpoint
from mesh_node.transport.errors import TransportError
from mesh_node.transport.messages import Ping, Pong
from mesh_node.transport.quic import QuicEndpoint

log = logging.getLogger("mesh_node.node")


@dataclass(frozen=True)
class NodeConfig:
    mesh_id: str
    name: str = ""
    host: str = "0.0.0.0"
    port: int = 7300
    peers: tuple[Address, ...] = ()
    home: Path = field(default_factory=default_home)
    ephemeral: bool = False
    dial_timeout: float = 5.0
    redial_interval: float = 5.0


class Node:
    """A mesh node. `await node.start()`, then `await node.stop()` (or `run_until_signal`)."""

    def __init__(self, config: NodeConfig, *, endpoint: Endpoint | None = None):
        self.config = config
        self.mesh = MeshSecret(config.mesh_id)
        if endpoint is None:
            identity = (
                NodeIdentity.generate()
                if config.ephemeral
                else NodeIdentity.load_or_create(config.home)
            )
            endpoint = QuicEndpoint(
                identity,
                self.mesh,
                registry=REGISTRY,
                handlers=Handlers(),
                host=config.host,
                port=config.port,
            )
        self.endpoint = endpoint
        self.identity = endpoint.identity
        self.endpoint.handlers.on_request(Ping, self._on_ping)
        self.endpoint.on_connected.append(self._peer_connected)
        self.endpoint.on_disconnected.append(self._peer_disconnected)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()

    @property
    def node_id(self):
        return self.identity.node_id

    def _peer_connected(self, conn) -> None:
        log.info("peer %s connected (%s:%d)", conn.peer.short, *conn.remote_address[:2])

    def _peer_disconnected(self, conn) -> None:
        log.info("peer %s disconnected: %s", conn.peer.short, conn.close_reason or "closed")

    def _on_ping(self, ctx: RequestContext, msg: Ping) -> Pong:
        return Pong(msg.seq)

    async def start(self) -> None:
        await self.endpoint.start()
        for address in self.config.peers:
            self._tasks.append(asyncio.create_task(self._keep_linked(address)))

    async def _keep_linked(self, address: Address) -> None:
        """Keep a connection to a bootstrap peer, redialing after loss (bounded pace)."""
        while True:
            try:
                conn = await self.endpoint.connect(address, timeout=self.config.dial_timeout)
                log.info("linked to %s at %s:%d", conn.peer.short, *address)
                await conn.wait_closed()
                log.info("link to %s:%d lost (%s)", *address, conn.close_reason)
            except TransportError as exc:
                log.warning("cannot reach peer %s:%d: %s", *address, exc)
            await asyncio.sleep(self.config.redial_interval)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.endpoint.close()
        self._stopped.set()

    async def run_until_signal(self, announce: Callable[[str], None] | None = None) -> None:
        """Run until SIGINT or SIGTERM, then leave cleanly. `announce` gets ready lines."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            if announce is not None:
                announce(f"listening on udp {self.endpoint.host}:{self.endpoint.port}")
                sys.stdout.flush()
            await stop.wait()
            log.info("signal received: leaving the mesh")
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.stop()
