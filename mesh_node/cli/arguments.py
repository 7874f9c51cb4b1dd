"""Argument types shared by several commands (argparse `type=` callables)."""

from __future__ import annotations

import argparse
import ipaddress
import re


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535")
    return port


def host_port(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} must be HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port_number(port)


def ipv4_address(text: str) -> str:
    """An IPv4 address literal, e.g. '192.168.1.20'."""
    try:
        return str(ipaddress.IPv4Address(text.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None


def host_name(text: str) -> str:
    """A DNS name as a browser puts it in the Host header, e.g. 'mesh.example.org' (no scheme,
    port or path)."""
    name = text.strip().lower().rstrip(".")
    if not re.fullmatch(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*", name):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a host name (give the name alone, e.g. mesh.example.org)"
        )
    return name


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}


def byte_size(text: str) -> int:
    """'512MiB', '4GiB', '2.5G', '1000000' -> bytes (K/M/G/T and KiB/MiB/GiB/TiB are binary,
    KB/MB/GB/TB decimal)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: use a number with an optional unit, e.g. 512MiB or 4GiB"
        )
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be more than zero")
    return size
