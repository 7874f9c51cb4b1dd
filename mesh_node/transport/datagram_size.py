"""How large the UDP datagrams of a QUIC connection are: the path's MTU where this host knows
it, QUIC's 1200-byte floor elsewhere.

aioquic sends datagrams of at most `QuicConfiguration.max_datagram_size` bytes, 1200 unless
told otherwise: the size every IP path carries (RFC 9000 section 14). Its per-packet work
(header protection, AEAD, frame parsing, all in Python) costs about as much as the bytes,
so a 4 KB message crosses as four packets and costs about four times one packet's time.
Where the whole path is known, larger datagrams are safe and much cheaper:

- loopback (both ends on this host): the loopback interface's MTU (64 KiB on Linux);
- a peer on a directly attached network (no router between, per the main routing table):
  that interface's MTU, e.g. 1500 bytes of Ethernet -> 1472-byte datagrams over IPv4.

A peer behind a router gets 1200 bytes: a link further on may carry less than the first one,
and aioquic has no path-MTU probing to find out. Everything is capped at `AIOQUIC_MAX`, since
aioquic writes STREAM and CRYPTO frame lengths as two-byte varints (below 16384 bytes).
Linux only (routes from /proc/net, the path MTU from IP_MTU); other systems get 1200.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
from pathlib import Path

from mesh_node.transport.addresses import IPAddress, ip_of

QUIC_MIN = 1200  # RFC 9000: every QUIC path carries datagrams of 1200 bytes
AIOQUIC_MAX = 16000  # below aioquic's 16384-byte frame length limit, headers included

IPV4_ROUTES = Path("/proc/net/route")
IPV6_ROUTES = Path("/proc/net/ipv6_route")
_IP_MTU = 14  # <linux/in.h>: the path MTU of a connected socket
_IPV6_MTU = 24  # <linux/in6.h>
_RTF_UP, _RTF_GATEWAY, _RTF_REJECT = 0x1, 0x2, 0x200
_HEADERS = {4: 20 + 8, 6: 40 + 8}  # IP + UDP header bytes

# a route: (network, metric, flags)
Route = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int, int]


def datagram_size(host: str, *, limit: int = AIOQUIC_MAX) -> int:
    """The datagram size for QUIC packets to `host` (an IP address literal)."""
    ip = ip_of(host)
    if ip is None or not sys.platform.startswith("linux"):
        return QUIC_MIN
    if not ip.is_loopback and not on_link(ip):
        return QUIC_MIN
    mtu = path_mtu(str(ip), ip.version)
    if mtu is None:
        return QUIC_MIN
    return max(QUIC_MIN, min(limit, mtu - _HEADERS[ip.version]))


def path_mtu(host: str, version: int) -> int | None:
    """The kernel's MTU for the route to `host` (a UDP socket connected to it; nothing is
    sent), or None when there is no route or no way to ask."""
    if version == 4:
        family, level, option = socket.AF_INET, socket.IPPROTO_IP, _IP_MTU
    else:
        family, level, option = socket.AF_INET6, socket.IPPROTO_IPV6, _IPV6_MTU
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((host, 9))  # any port: connecting a UDP socket only picks the route
            return sock.getsockopt(level, option)
    except OSError:
        return None


def on_link(ip: IPAddress) -> bool:
    """Whether the main routing table reaches `ip` without a gateway (unknown: False)."""
    try:
        if ip.version == 4:
            return reaches_directly(ip, ipv4_routes(IPV4_ROUTES.read_text()))
        return reaches_directly(ip, ipv6_routes(IPV6_ROUTES.read_text()))
    except (OSError, ValueError):
        return False


def reaches_directly(ip: IPAddress, routes: list[Route]) -> bool:
    """Whether the most specific route to `ip` that is up (lowest metric among equals) has no
    gateway and is not a reject route."""
    matching = [r for r in routes if ip in r[0] and r[2] & _RTF_UP]
    if not matching:
        return False
    _, _, flags = max(matching, key=lambda r: (r[0].prefixlen, -r[1]))
    return not flags & (_RTF_GATEWAY | _RTF_REJECT)


def ipv4_routes(text: str) -> list[Route]:
    """Parse /proc/net/route (addresses as the kernel's u32 in host byte order, in hex)."""
    routes = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        dest, flags, metric, mask = fields[1], fields[3], fields[6], fields[7]
        address = ipaddress.IPv4Address(struct.pack("=I", int(dest, 16)))
        netmask = ipaddress.IPv4Address(struct.pack("=I", int(mask, 16)))
        network = ipaddress.IPv4Network(f"{address}/{netmask}", strict=False)
        routes.append((network, int(metric), int(flags, 16)))
    return routes


def ipv6_routes(text: str) -> list[Route]:
    """Parse /proc/net/ipv6_route (destination, prefix length, ..., metric, ..., flags)."""
    routes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10:
            continue
        address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        network = ipaddress.IPv6Network(f"{address}/{int(fields[1], 16)}", strict=False)
        routes.append((network, int(fields[5], 16), int(fields[8], 16)))
    return routes
