"""LAN discovery with mDNS/DNS-SD (zeroconf).

Each node registers `_mesh-node._udp.local.` with TXT properties `id` (node id), `tag`
(the mesh's discovery tag, derived from the mesh id; never the id itself) and `v` (protocol
version), and browses for the same type. Records of other meshes (another tag) are ignored;
a node of our mesh is handed to `on_found`, which joins through it (the QUIC handshake then
proves who it is and that it belongs to the mesh).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
from collections.abc import Callable

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mesh_node.identity import NodeId
from mesh_node.membership.messages import Address

log = logging.getLogger("mesh_node.discovery")

SERVICE_TYPE = "_mesh-node._udp.local."
PROTOCOL_VERSION = "1"


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
            task = asyncio.ensure_future(self._lookup(service_type, name))
            self._lookups.add(task)
            task.add_done_callback(self._lookups.discard)

    async def _lookup(self, service_type: str, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, 3000):
            return
        props = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in (info.properties or {}).items()
        }
        if props.get("tag") != self.tag or props.get("v") != PROTOCOL_VERSION:
            return  # another mesh (or version): not ours to join
        try:
            node_id = NodeId.parse(props.get("id") or "")
        except ValueError:
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
