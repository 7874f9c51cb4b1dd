"""An in-memory network: many endpoints in one process, for tests and simulations.

Connections run the real handshake, framing and RPC code (`Connection`); only the carrier
differs. It mirrors what matters of QUIC: ordered reliable streams, stream resets, a
connection that goes silent when the path breaks and is closed by the idle timeout, dials
that get no answer from unreachable or crashed nodes. Faults: `partition`, `heal`,
`crash` (a node vanishes without a word), per-link latency.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Callable, Iterable
from typing import Any

from mesh_node.identity import MeshSecret, NodeId, NodeIdentity
from mesh_node.transport.connection import Connection
from mesh_node.transport.endpoint import Address, Endpoint
from mesh_node.transport.errors import ConnectionLost, ErrorCode


class _Pipe:
    """One direction of a connection: ordered delivery after the link's latency."""

    def __init__(self, network: MemoryNetwork, src: Address, dst: Address):
        self.network = network
        self.src, self.dst = src, dst
        self.queue: collections.deque[tuple[float, Callable[[], None]]] = collections.deque()
        self.held: list[Callable[[], None]] = []
        self.scheduled: asyncio.Handle | None = None

    def push(self, deliver: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        self.queue.append((loop.time() + self.network.latency(self.src, self.dst), deliver))
        if self.scheduled is None:
            self._schedule()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        at = self.queue[0][0]
        if at <= loop.time():
            self.scheduled = loop.call_soon(self._run)
        else:
            self.scheduled = loop.call_at(at, self._run)

    def _run(self) -> None:
        self.scheduled = None
        now = asyncio.get_running_loop().time()
        while self.queue and self.queue[0][0] <= now:
            _, deliver = self.queue.popleft()
            if not self.network.partitioned(self.src, self.dst):
                deliver()
            else:
                self.held.append(deliver)  # QUIC would retransmit once the path is back
        if self.queue:
            self._schedule()

    def release(self) -> None:
        held, self.held = self.held, []
        for deliver in held:
            deliver()

    def cancel(self) -> None:
        if self.scheduled is not None:
            self.scheduled.cancel()
            self.scheduled = None
        self.queue.clear()
        self.held.clear()


class MemoryCarrier:
    """One side of an in-memory connection, offering the `Carrier` operations."""

    def __init__(self, endpoint: MemoryEndpoint, remote: Address, is_client: bool):
        self.endpoint = endpoint
        self.network = endpoint.network
        self.is_client = is_client
        self.remote_address = remote
        self.remote_ip = remote[0]
        self.peer: MemoryCarrier | None = None
        self.connection: Connection | None = None
        self._next = {False: 0 if is_client else 1, True: 2 if is_client else 3}
        self._send_closed: set[int] = set()
        self._pipe = _Pipe(self.network, endpoint.address, remote)
        self._terminated = False
        self._silent_since: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None

    # ---- Carrier operations
    def open_stream(self, unidirectional: bool) -> int:
        stream_id = self._next[unidirectional]
        self._next[unidirectional] += 4
        return stream_id

    def write(self, stream_id: int, data: bytes | memoryview, end: bool = False) -> None:
        if stream_id in self._send_closed:
            raise RuntimeError("cannot send on a finished or reset stream")
        if end:
            self._send_closed.add(stream_id)
        payload = bytes(data)
        self.network.count(self.endpoint.address, len(payload))
        self._send(lambda conn: conn.stream_data(stream_id, payload, end))

    def flush(self) -> None:
        pass  # every write is on its way already

    def reset(self, stream_id: int, code: int) -> None:
        if stream_id in self._send_closed:
            return
        self._send_closed.add(stream_id)
        self._send(lambda conn: conn.stream_reset(stream_id, code))

    def stop(self, stream_id: int, code: int) -> None:
        def deliver(conn: Connection) -> None:
            assert self.peer is not None
            self.peer._send_closed.add(stream_id)  # as QUIC: STOP_SENDING resets the sender
            conn.stream_reset(stream_id, code)

        self._send(deliver)

    def unacked(self, stream_id: int) -> int:
        return 0

    def acknowledge(self) -> None:
        pass  # every write counts as acknowledged at once (unacked)

    def server_key(self) -> bytes | None:
        peer = self.peer
        return peer.endpoint.node_id.key if peer is not None and self.is_client else None

    def rtt(self) -> float | None:
        latency = self.network.latency(self.endpoint.address, self.remote_address)
        return 2 * latency

    def close(self, code: int, reason: str) -> None:
        if self._terminated:
            return
        self._send(lambda conn: conn.connection_terminated(code, reason))
        self._terminate_local(drop_pending=False)  # what was written still arrives

    # ---- internals
    def _send(self, action: Callable[[Connection], None]) -> None:
        if self._terminated or self.peer is None:
            return
        peer = self.peer

        def deliver() -> None:
            if not peer._terminated and peer.connection is not None:
                peer._heard()
                action(peer.connection)

        self._pipe.push(deliver)

    def _heard(self) -> None:
        self._silent_since = None

    def _terminate_local(self, drop_pending: bool = True) -> None:
        self._terminated = True
        if drop_pending:
            self._pipe.cancel()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self.network._carriers.discard(self)

    def path_broken(self) -> None:
        """The path to the peer went silent: close after the idle timeout unless healed."""
        if self._terminated or self._idle_timer is not None:
            return
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self.endpoint.idle_timeout, self._idle_expired)

    def path_restored(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._pipe.release()

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self._terminated or self.connection is None:
            return
        conn = self.connection
        self._terminate_local()
        conn.connection_terminated(ErrorCode.LINK_ERROR, "idle timeout: no answer from peer")


class MemoryNetwork:
    """The shared medium of many `MemoryEndpoint`s."""

    def __init__(self, latency: float = 0.0):
        self.default_latency = latency
        self._latency: dict[frozenset[Address], float] = {}
        self._endpoints: dict[Address, MemoryEndpoint] = {}
        self._groups: dict[Address, int] | None = None
        self._carriers: set[MemoryCarrier] = set()
        self._addresses = itertools.count(1)
        self.bytes_sent: collections.Counter[Address] = collections.Counter()

    def allocate_address(self) -> Address:
        n = next(self._addresses)
        return (f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 7300)

    def endpoint(
        self,
        identity: NodeIdentity,
        mesh: MeshSecret,
        *,
        address: Address | None = None,
        **endpoint_args: Any,  # registry, handlers, limits, idle_timeout
    ) -> MemoryEndpoint:
        """A new endpoint on this network, at `address` or the next free one."""
        host, port = address or self.allocate_address()
        return MemoryEndpoint(self, identity, mesh, host=host, port=port, **endpoint_args)

    # ---- faults
    def latency(self, a: Address, b: Address) -> float:
        if not self._latency:
            return self.default_latency
        return self._latency.get(frozenset((a, b)), self.default_latency)

    def set_latency(self, a: Address, b: Address, seconds: float) -> None:
        self._latency[frozenset((a, b))] = seconds

    def partitioned(self, a: Address, b: Address) -> bool:
        groups = self._groups
        return groups is not None and groups.get(a, -1) != groups.get(b, -1)

    def reachable(self, a: Address, b: Address) -> bool:
        """Both nodes are up and on the same side of any partition."""
        return a in self._endpoints and b in self._endpoints and not self.partitioned(a, b)

    def partition(self, *groups: Iterable[Address]) -> None:
        """Only nodes in the same group can talk; nodes in no group are cut off."""
        self._groups = {addr: i for i, group in enumerate(groups) for addr in group}
        self._paths_changed()

    def heal(self) -> None:
        self._groups = None
        self._paths_changed()

    def crash(self, address: Address) -> None:
        """The node vanishes: no goodbye, its peers' connections time out."""
        endpoint = self._endpoints.pop(address, None)
        if endpoint is not None:
            endpoint._crash()
        self._paths_changed()

    def _paths_changed(self) -> None:
        for carrier in list(self._carriers):
            if self.reachable(carrier.endpoint.address, carrier.remote_address):
                carrier.path_restored()
            else:
                carrier.path_broken()

    def count(self, address: Address, nbytes: int) -> None:
        self.bytes_sent[address] += nbytes


class MemoryEndpoint(Endpoint):
    """An endpoint on a `MemoryNetwork`."""

    def __init__(
        self,
        network: MemoryNetwork,
        identity: NodeIdentity,
        mesh: MeshSecret,
        *,
        idle_timeout: float = 30.0,
        **endpoint_args: Any,  # registry, handlers, host, port, limits: see Endpoint
    ):
        super().__init__(identity, mesh, **endpoint_args)
        self.network = network
        self.idle_timeout = idle_timeout
        self._listening = False

    async def start(self) -> None:
        if self.address in self.network._endpoints:
            raise OSError(f"address {self.host}:{self.port} already in use")
        self.network._endpoints[self.address] = self
        self._listening = True

    async def _dial(
        self, host: str, port: int, expect: NodeId | None, timeout: float
    ) -> Connection:
        remote = (host, port)
        server = self.network._endpoints.get(remote)
        if server is None or not self.network.reachable(self.address, remote):
            await asyncio.sleep(timeout)  # a datagram into the void: nothing ever answers
            raise ConnectionLost(f"no answer from {host}:{port} within {timeout:g}s")
        client_side = MemoryCarrier(self, remote, is_client=True)
        server_side = MemoryCarrier(server, self.address, is_client=False)
        client_side.peer, server_side.peer = server_side, client_side
        self.network._carriers.update((client_side, server_side))
        server_side.connection = server.new_connection(server_side)
        conn = self.new_connection(client_side, expect)
        client_side.connection = conn
        conn.start()
        return await self._await_open(conn, f"{host}:{port}", timeout)

    async def _shutdown(self) -> None:
        self.network._endpoints.pop(self.address, None)
        self._listening = False

    def _crash(self) -> None:
        self._closing = True
        self._listening = False
        for carrier in list(self.network._carriers):
            if carrier.endpoint is self:
                conn = carrier.connection
                carrier._terminate_local()
                if conn is not None:
                    conn.connection_terminated(ErrorCode.SHUTTING_DOWN, "crashed")

    def __repr__(self) -> str:
        return f"MemoryEndpoint({self.node_id.short} at {self.host}:{self.port})"
