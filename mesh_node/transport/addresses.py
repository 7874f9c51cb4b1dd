"""IP address literals as peers and sockets report them."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip_of(host: str) -> IPAddress | None:
    """The address a literal names (a zone '%eth0' dropped, '::ffff:1.2.3.4' as the IPv4
    address it maps), or None when `host` is not an IP address literal."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def normalize_host(host: str) -> str:
    """'::ffff:1.2.3.4' -> '1.2.3.4' (aioquic reports IPv4 peers of dual-stack sockets so)."""
    ip = ip_of(host)
    if isinstance(ip, ipaddress.IPv4Address) and ":" in host:
        return str(ip)
    return host
