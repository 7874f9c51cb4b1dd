"""IP address literals as peers and sockets report them."""

from __future__ import annotations

import errno
import ipaddress
import re
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PortInUse(OSError):
    """A port this node listens on is taken (another mesh-node on this machine, most often).
    `service` says whose: "quic", "api" or "console"."""

    def __init__(self, service: str, what: str, host: str, port: int):
        super().__init__(
            errno.EADDRINUSE, f"{what} cannot listen on {host}:{port}: the port is taken"
        )
        self.service, self.host, self.port = service, host, port

    def __str__(self) -> str:
        return str(self.strerror)


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


def calling_address(family: int, remote: str, own: str | None = None) -> str:
    """The local address a socket of `family` that calls `remote` (an IP literal) binds:
    loopback's for a loopback address (its answers can only come from there, and nothing else
    need listen); else `own`, for IPv4 when it is one IPv4 address or a name (a node bound to
    it calls from it); else every interface (an IPv4 call of a node on '::' included)."""
    v6 = family == socket.AF_INET6
    ip = ip_of(remote)
    if ip is not None and ip.is_loopback and (ip.version == 6) == v6:
        return "::1" if v6 else "127.0.0.1"
    if own is not None and not v6:
        own_ip = ip_of(own)
        if own_ip is None:
            return own
        if own_ip.version == 4 and not own_ip.is_unspecified:
            return str(own_ip)
    return "::" if v6 else "0.0.0.0"


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def host_error(host: str) -> str | None:
    """Why `host` is neither an IP address literal nor a host name that could resolve (dot-
    separated labels of 1-63 letters, digits, '-' or '_', 253 characters in all), or None."""
    if ip_of(host) is not None:
        return None
    name = host[:-1] if host.endswith(".") else host
    if 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split(".")):
        return None
    return f"not an IP address or host name: {host!r:.80}"


def port_error(port: object) -> str | None:
    """Why `port` is not a UDP/TCP port one can send to (an int in 1-65535), or None."""
    if not isinstance(port, int) or not 0 < port < 65536:
        return f"port {port!r:.20} out of range (1-65535)"
    return None


def address_error(host: str, port: int) -> str | None:
    """Why (host, port) could never be dialed (see `host_error`, `port_error`), or None."""
    return port_error(port) or host_error(host)
