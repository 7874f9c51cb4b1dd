"""LAN discovery with mDNS/DNS-SD (zeroconf).

Each node registers `_mesh-node._udp.local.` with TXT properties `id` (node id), `tag`
(the mesh's discovery tag, derived from the mesh id; never the id itself) and `v` (protocol
version), and browses for the same type. Records of other meshes (another tag) are ignored;
a node of our mesh is handed to `on_found`, which joins through it (the QUIC handshake then
proves who it is and that it belongs to the mesh).

A record proves nothing (the tag is public in every record of the mesh, so any LAN host can
copy it), so what it names is dialed through a `DiscoveryDialer`, which bounds the joins.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mesh_node.identity import NodeId
from mesh_node.membership.messages import Address

log = logging.getLogger("mesh_node.discovery")

SERVICE_TYPE = "_mesh-node._udp.local."
PROTOCOL_VERSION = "1"
MAX_DIALS = 4  # discovery joins in flight at once
MAX_WAITING = 32  # found addresses waiting for a dial; more are not kept
RETRY_AFTER = 30.0  # seconds before an address whose join failed is dialed again
MAX_REMEMBERED = 1024  # failed addresses remembered (oldest forgotten first)
MAX_LOOKUPS = 32  # records being looked up at once; more announced meanwhile are not


class MdnsDiscovery:
    def __init__(
        self,
        node_id: NodeId,
        port: int,
        addresses: list[str],
        tag: str,
        on_found: Callable[[NodeId, list[Address]], None],
        interfaces: list[str] | None = None,
    ):
        self.node_id = node_id
        self.port = port
        self.addresses = [a for a in addresses if _is_ipv4(a)]
        self.tag = tag
        self.on_found = on_found
        self.interfaces = interfaces
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._lookups: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        interfaces = self.interfaces or InterfaceChoice.All
        try:
            self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        except OSError as exc:
            where = ", ".join(self.interfaces) if self.interfaces else "all interfaces"
            raise OSError(exc.errno, f"mDNS cannot run on {where}: {exc.strerror or exc}") from None
        # a random suffix: a restarted node must not collide with its own stale record
        name = f"{self.node_id.short}-{secrets.token_hex(2)}.{SERVICE_TYPE}"
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            name,
            addresses=[socket.inet_aton(a) for a in self.addresses],
            port=self.port,
            properties={"id": str(self.node_id), "tag": self.tag, "v": PROTOCOL_VERSION},
        )
        await self._zc.async_register_service(self._info)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_service_state_change]
        )
        where = ", ".join(self.interfaces) if self.interfaces else "all interfaces"
        log.info("mDNS discovery on %s", where)

    def _on_service_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            if len(self._lookups) >= MAX_LOOKUPS:  # a flood of records: an honest one returns
                log.debug("mDNS record %s not looked up: %d lookups running", name, MAX_LOOKUPS)
                return
            task = asyncio.ensure_future(self._lookup(service_type, name))
            self._lookups.add(task)
            task.add_done_callback(self._lookups.discard)

    async def _lookup(self, service_type: str, name: str) -> None:
        try:
            await self._read_record(service_type, name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a record from anyone on the LAN: never an error of ours
            log.debug("mDNS record %s not usable: %r", name, exc)

    async def _read_record(self, service_type: str, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, 3000):
            return
        # TXT keys and values are any bytes (a hostile record need not be UTF-8)
        props = {
            (k.encode() if isinstance(k, str) else k): (v.encode() if isinstance(v, str) else v)
            for k, v in (info.properties or {}).items()
        }
        if props.get(b"tag") != self.tag.encode() or props.get(b"v") != PROTOCOL_VERSION.encode():
            return  # another mesh (or version): not ours to join
        try:
            node_id = NodeId.parse((props.get(b"id") or b"").decode())
        except ValueError:  # (UnicodeDecodeError included)
            log.debug("mDNS record %s has a bad node id", name)
            return
        if node_id == self.node_id or info.port is None:
            return
        addresses = [Address(ip, info.port) for ip in info.parsed_addresses(IPVersion.V4Only)]
        if addresses:
            self.on_found(node_id, addresses)

    async def stop(self) -> None:
        for task in list(self._lookups):
            task.cancel()
        if self._browser is not None:
            with contextlib.suppress(Exception):
                await self._browser.async_cancel()
        if self._zc is not None:
            with contextlib.suppress(Exception):
                if self._info is not None:
                    await self._zc.async_unregister_service(self._info)
            await self._zc.async_close()
        self._zc = self._browser = self._info = None


class DiscoveryDialer:
    """Joins through the nodes mDNS found, within bounds: at most MAX_DIALS joins at once, at
    most MAX_WAITING found (address, node) pairs waiting (newer ones are not kept: they are
    announced again), one join per address at a time, none to a node at an address within
    RETRY_AFTER of a failed one, and no dial to an address no peer can be at (unspecified,
    multicast, broadcast, reserved; a loopback address only when discovery itself runs on
    loopback). Failures count per (address, node): a record naming a real node's address
    with a made-up id does not shut the real node's record out.

    `join(address, node_id)` joins through the address, expecting that node; True on success.
    """

    def __init__(
        self,
        join: Callable[[Address, NodeId], Awaitable[bool]],
        *,
        allow_loopback: bool,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.join = join
        self.allow_loopback = allow_loopback
        self.clock = clock
        self.refused = 0  # found records not dialed (unusable, failing, or no room)
        self._waiting: OrderedDict[tuple[Address, NodeId], None] = OrderedDict()
        self._dialing: set[Address] = set()
        # (address, node) -> when its join failed
        self._failed: OrderedDict[tuple[Address, NodeId], float] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def found(self, node_id: NodeId, addresses: list[Address]) -> None:
        """A record of our mesh named `node_id` at these addresses: dial the first usable."""
        address = next((a for a in addresses if self.usable(a)), None)
        if address is None or self._closed:
            self.refused += 1
            return
        key = (address, node_id)
        failed_at = self._failed.get(key)
        if failed_at is not None and self.clock() - failed_at < RETRY_AFTER:
            self.refused += 1
            return
        if key in self._waiting:
            return
        if len(self._waiting) >= MAX_WAITING:
            self.refused += 1
            return
        self._waiting[key] = None
        self._next()

    def usable(self, address: Address) -> bool:
        try:
            ip = ipaddress.IPv4Address(address.host)
        except ValueError:
            return False
        if not 0 < address.port < 65536:
            return False
        if ip.is_loopback:
            return self.allow_loopback
        return not (ip.is_unspecified or ip.is_multicast or ip.is_reserved or ip == _BROADCAST)

    @property
    def dialing(self) -> int:
        return len(self._dialing)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _next(self) -> None:
        """Dials the oldest waiting records whose address is not being dialed already."""
        for key in list(self._waiting):
            if len(self._dialing) >= MAX_DIALS or self._closed:
                return
            address, node_id = key
            if address in self._dialing:
                continue
            del self._waiting[key]
            self._dialing.add(address)
            log.info("discovered node %s on the LAN at %s", node_id.short, address)
            task = asyncio.ensure_future(self._dial(address, node_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _dial(self, address: Address, node_id: NodeId) -> None:
        joined = False
        try:
            joined = await self.join(address, node_id)
        except Exception:
            log.exception("joining through %s failed unexpectedly", address)
        finally:
            self._dialing.discard(address)
            key = (address, node_id)
            self._failed.pop(key, None)
            if not joined:
                self._failed[key] = self.clock()
                while len(self._failed) > MAX_REMEMBERED:
                    self._failed.popitem(last=False)
            self._next()

    async def close(self) -> None:
        self._closed = True
        self._waiting.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _is_ipv4(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False


def local_ipv4_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this machine's interfaces."""
    import ifaddr

    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                found.append(ip.ip)
    return sorted(set(found))


def local_ipv6_addresses() -> list[str]:
    """This machine's IPv6 addresses that a peer can dial as they are: global and unique-local
    ones, not loopback, nor link-local (fe80::/10 needs the zone of the peer's own interface,
    which only the peer knows)."""
    import ifaddr

    found = set()
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, tuple):  # (address, flowinfo, scope id)
                address = ipaddress.IPv6Address(ip.ip[0].split("%")[0])
                if not (address.is_loopback or address.is_link_local or address.is_multicast):
                    found.add(address)
    return [str(a) for a in sorted(found)]
