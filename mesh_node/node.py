"""Composition root: builds a node's parts from its config and owns their lifetimes."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh_node.blocking import run_blocking
from mesh_node.cancellation import cancel_and_wait
from mesh_node.console.server import ConsoleServer
from mesh_node.engine.catalog import ResolvedModel, resolve_model
from mesh_node.expert_parallel.coordinator import ExpertParallel, ExpertParallelConfig
from mesh_node.expert_parallel.independent_shards import IndependentShards
from mesh_node.expert_parallel.service import ExpertService
from mesh_node.identity import MeshSecret, NodeId, NodeIdentity, default_home
from mesh_node.membership.discovery import (
    DiscoveryDialer,
    MdnsDiscovery,
    local_ipv4_addresses,
    local_ipv6_addresses,
)
from mesh_node.membership.messages import Address
from mesh_node.membership.state import SelfState, machine_id, probe_hardware
from mesh_node.membership.swim import Membership, MembershipConfig
from mesh_node.membership.view import MeshView
from mesh_node.protocol import REGISTRY
from mesh_node.serving.api import ApiServer
from mesh_node.serving.gateway import Gateway, GatewayConfig
from mesh_node.serving.hosting import Hosting, HostingConfig
from mesh_node.serving.local import LocalModels
from mesh_node.serving.tunnel import TunnelHost
from mesh_node.transport.connection import Connection, Handlers, RequestContext
from mesh_node.transport.endpoint import Endpoint
from mesh_node.transport.express import ExpressServer
from mesh_node.transport.handshake import SOFTWARE
from mesh_node.transport.messages import Ping, Pong
from mesh_node.transport.quic import QuicEndpoint

log = logging.getLogger("mesh_node.node")

HARDWARE_REFRESH = 30.0
SHUTDOWN_GRACE = 5.0  # seconds answers under way get to finish when the node stops
# seconds a node that may find its mesh by mDNS waits for it before its first host election
# (a joiner that elects itself as if alone loads what the mesh already hosts, or takes it over)
MDNS_INTRODUCTIONS = 2.0


@dataclass(frozen=True)
class NodeConfig:
    mesh_id: str
    name: str = ""
    host: str = "0.0.0.0"
    port: int = 7300
    peers: tuple[tuple[str, int], ...] = ()
    advertise: tuple[tuple[str, int], ...] = ()
    home: Path = field(default_factory=default_home)
    ephemeral: bool = False
    models: tuple[str, ...] = ()  # --model values; none: the built-in model
    model_cache: Path | None = None  # Hugging Face cache for repo ids (None: the hub's default)
    client: bool = False  # never hosts, still serves the API
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] = ()
    console_host: str = "127.0.0.1"
    console_port: int | None = 3131  # None: no console
    api_host: str = "127.0.0.1"
    api_port: int | None = 9337  # None: no API
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()  # names the API and console answer to besides their own
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    hosting: HostingConfig = field(default_factory=HostingConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    experts: ExpertParallelConfig = field(default_factory=ExpertParallelConfig)
    machine: str | None = None  # the machine label gossiped (None: this kernel's, machine_id)


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
        self.membership: Membership | None = None
        self.view: MeshView | None = None
        self.local = LocalModels()
        self.hosting: Hosting | None = None
        self.gateway: Gateway | None = None
        self.tunnel = TunnelHost(self.endpoint.handlers, self.local)
        # express lanes for expert calls: a QUIC node that holds experts grants them
        self.lanes: ExpressServer | None = None
        if isinstance(endpoint, QuicEndpoint) and config.experts.enabled and config.experts.lanes:
            self.lanes = ExpressServer(REGISTRY, host=config.host)
            self.lanes.attach(endpoint)
            self.lanes.on_call(Ping, lambda peer, msg: Pong(msg.seq))  # latency probes
        self.expert_service = ExpertService(self.endpoint.handlers, lanes=self.lanes)
        self.experts: ExpertParallel | None = None
        self.shards: IndependentShards | None = None
        self.discovery: MdnsDiscovery | None = None
        self.dialer: DiscoveryDialer | None = None
        self.console: ConsoleServer | None = None
        self.api: ApiServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id

    def _on_ping(self, ctx: RequestContext, msg: Ping) -> Pong:
        return Pong(msg.seq)

    def _peer_connected(self, conn: Connection) -> None:
        assert conn.peer is not None
        log.debug("connection with %s (%s:%d)", conn.peer.short, *conn.remote_address[:2])

    def advertised_addresses(self) -> list[Address]:
        port = self.endpoint.port
        if self.config.advertise:
            return [Address(h, p) for h, p in self.config.advertise]
        host = self.endpoint.host
        if host not in ("0.0.0.0", "::", ""):
            return [Address(host, port)]
        found = local_ipv4_addresses()
        if host == "::":  # (IPv4 too: on Linux an IPv6 socket on all interfaces takes both)
            found += local_ipv6_addresses()
        if not found and host != "::" and local_ipv6_addresses():
            log.warning(
                "this machine has no IPv4 address but IPv6 ones, and this node listens on "
                "IPv4 only: other machines cannot reach it (listen on IPv6 with --host ::)"
            )
        found = found or ["::1" if host == "::" else "127.0.0.1"]
        return [Address(ip, port) for ip in found[:8]]

    async def start(self) -> None:
        offered = [] if self.config.client else await self._resolve_models()  # fail fast
        await self.endpoint.start()
        if self.lanes is not None:
            try:
                self.lanes.start()
            except OSError as exc:  # expert calls all go over QUIC then
                log.warning("no express lanes: cannot open their UDP socket (%s)", exc)
        addresses = self.advertised_addresses()
        now_ms = int(time.time() * 1000)
        self_state = SelfState(
            self.node_id.key,
            start_version=now_ms,
            name=self.config.name or socket.gethostname(),
            software=SOFTWARE,
            role="client" if self.config.client else "worker",
            addresses=addresses,
            hardware=probe_hardware(with_gpus=False),
            machine=machine_id() if self.config.machine is None else self.config.machine,
        )
        self.membership = Membership(
            self.endpoint, self_state, config=self.config.membership, seeds=self.config.peers
        )
        self.experts = ExpertParallel(
            self.endpoint,
            self.membership,
            self.expert_service,
            self.endpoint.handlers,
            config=self.config.experts,
            device=self.config.hosting.device,
            dtype=self.config.hosting.dtype,
            elected_host=self._elected_host,
        )
        self.shards = IndependentShards(self.experts, enabled=self.config.experts.shards)
        self.hosting = Hosting(
            self.membership,
            self.local,
            offered,
            config=self.config.hosting,
            client=self.config.client,
            experts=self.experts,
            shards=self.shards,
        )
        self.gateway = Gateway(
            self.node_id,
            self.endpoint,
            self.membership.table,
            self.local,
            self.hosting,
            config=self.config.gateway,
        )
        self.view = MeshView(self.membership.table, extra=self._status_sections)
        self.hosting.on_change(self.view.publish_status)
        self.hosting.on_change(self.experts.kick)
        self.experts.on_change(self.view.publish_status)
        await self.membership.start()
        if self.config.mdns:  # (started below: the first election waits for what it finds)
            self.membership.expect_introductions(MDNS_INTRODUCTIONS)
        await self.hosting.start()
        await self.experts.start()
        self._spawn(self._hardware_loop())
        if self.config.api_port is not None:
            self.api = ApiServer(
                self.gateway,
                host=self.config.api_host,
                port=self.config.api_port,
                api_key=self.config.api_key,
                allowed_hosts=self.config.allowed_hosts,
                shutdown_timeout=SHUTDOWN_GRACE,
            )
            await self.api.start()
        if self.config.console_port is not None:
            self.console = ConsoleServer(
                self.view,
                host=self.config.console_host,
                port=self.config.console_port,
                allowed_hosts=self.config.allowed_hosts,
            )
            await self.console.start()
        if self.config.mdns:
            interfaces = list(self.config.mdns_interfaces)
            self.dialer = DiscoveryDialer(
                self._join_discovered,
                allow_loopback=bool(interfaces)
                and all(ipaddress.ip_address(i).is_loopback for i in interfaces),
            )
            self.discovery = MdnsDiscovery(
                self.node_id,
                self.endpoint.port,
                [a.host for a in addresses],
                self.mesh.discovery_tag,
                self._discovered,
                interfaces=interfaces or None,
            )
            await self.discovery.start()

    async def _resolve_models(self) -> list[ResolvedModel]:
        """--model values to local folders (downloading what is missing, off the loop)."""
        specs, cache = self.config.models or (None,), self.config.model_cache
        return await asyncio.to_thread(
            lambda: [resolve_model(spec, cache_dir=cache) for spec in specs]
        )

    def _status_sections(self) -> dict[str, Any]:
        return {
            "hosting": self.hosting.status() if self.hosting is not None else [],
            "experts": self.experts.status() if self.experts is not None else [],
            "shards": self.shards.status() if self.shards is not None else [],
        }

    def _elected_host(self, model: str) -> NodeId | None:
        election = self.hosting.elections.get(model) if self.hosting is not None else None
        return election.hosts[0] if election is not None and election.hosts else None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _discovered(self, node_id: NodeId, addresses: list[Address]) -> None:
        membership = self.membership
        if membership is None:
            return
        member = membership.table.get(node_id)
        if member is not None and member.live:
            return
        if self.dialer is not None:
            self.dialer.found(node_id, addresses)

    async def _join_discovered(self, address: Address, node_id: NodeId) -> bool:
        membership = self.membership
        return membership is not None and await membership.join(address, expect=node_id)

    async def _hardware_loop(self) -> None:
        """GPUs need torch (slow to import): probe off the loop, then refresh now and then."""
        while True:
            hardware = await run_blocking(probe_hardware, "hardware-probe")
            if self.membership is not None:
                current = self.membership.self_state.current.hardware
                if current is None or _hardware_moved(current, hardware):
                    self.membership.update_state(hardware=hardware)
            await asyncio.sleep(HARDWARE_REFRESH)

    async def stop(self) -> None:
        """Leave the mesh cleanly: answers under way get SHUTDOWN_GRACE seconds to finish
        (this node's API clients' and those tunnelled from other nodes alike), then peers are
        told at once, then connections close."""
        draining = [self.tunnel.drain(SHUTDOWN_GRACE)]
        if self.api is not None:
            draining.append(self.api.stop())
        await asyncio.gather(*draining)
        if self.console is not None:
            await self.console.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.dialer is not None:
            await self.dialer.close()
        await cancel_and_wait(list(self._tasks))
        if self.experts is not None:  # (past the grace: what is still computing ends now)
            self.experts.close_routes("this node is stopping")
        if self.membership is not None:
            await self.membership.leave()
        if self.hosting is not None:
            await self.hosting.stop()
        if self.experts is not None:
            await self.experts.stop()
        if self.lanes is not None:  # (its thread may be answering a call: joined off the loop)
            await run_blocking(self.lanes.close, "lanes-close")
        await self.endpoint.close()

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
                if self.console is not None:
                    announce(f"console on {self.console.url}")
                if self.api is not None:
                    announce(f"api on {self.api.base_url}")
                sys.stdout.flush()
            await stop.wait()
            log.info("signal received: leaving the mesh")
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.stop()


def _hardware_moved(old: Any, new: Any) -> bool:
    """Worth telling the mesh: GPUs changed, or free memory moved by more than 5%."""
    if old.gpus != new.gpus or old.cpu_cores != new.cpu_cores:
        return True
    return abs(old.ram_free - new.ram_free) > 0.05 * max(new.ram_total, 1)
