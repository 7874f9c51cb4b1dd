"""Argument types shared by several commands (argparse `type=` callables)."""

from __future__ import annotations

import argparse
import ipaddress
import re

from mesh_node.transport.addresses import host_error, port_error


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535")
    return port


def host_port(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[IPv6]:PORT' -> (host, port), an address one can dial: an IP address or
    a host name, an IPv6 address in brackets (a zone too: '[fe80::1%eth0]:7300'), a port in
    1-65535."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host if sep else "")
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} must be [IPv6]:PORT, e.g. [fd00::1]:7300"
            ) from None
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise argparse.ArgumentTypeError(
                f"{text!r}: put an IPv6 address in brackets, e.g. [fd00::1]:7300"
            )
        if not sep or not host:
            raise argparse.ArgumentTypeError(f"{text!r} must be HOST:PORT")
    number = port_number(port)
    problem = port_error(number) or host_error(host)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return host, number


def listen_host(text: str) -> str:
    """An address to listen on: an IP address literal (IPv6 with or without brackets) or a
    host name."""
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    problem = host_error(host)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return host


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
