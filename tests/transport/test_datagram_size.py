"""Datagram sizes per path: large where the whole path is known (loopback, a directly attached
network), QUIC's 1200-byte floor elsewhere; and real connections that use them."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mesh_node.identity import new_mesh_id
from mesh_node.transport.datagram_size import (
    AIOQUIC_MAX,
    QUIC_MIN,
    datagram_size,
    ipv4_routes,
    ipv6_routes,
    reaches_directly,
)
from mesh_node.transport.quic import SOCKET_BUFFER
from mesh_node.transport.tensors import Tensor
from tests.transport.conftest import Scale, connected, quic_pair

RMEM_MAX = int(Path("/proc/sys/net/core/rmem_max").read_text()) if sys.platform == "linux" else 0
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux routes only")

IPV4_TABLE = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth1\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0
eth1\t0000010A\t0100000A\t0003\t0\t0\t0\t0000FFFF\t0\t0\t0
eth1\t0000020A\t00000000\t0201\t0\t0\t0\t0000FFFF\t0\t0\t0
"""

IPV6_TABLE = """\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth0
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
"""  # noqa: E501  (the kernel's own line format)


def test_routes_decide_which_peers_are_on_a_directly_attached_network():
    routes = ipv4_routes(IPV4_TABLE)
    assert [str(r[0]) for r in routes] == [
        "0.0.0.0/0", "192.0.2.0/24", "10.0.0.0/8", "10.1.0.0/16", "10.2.0.0/16"
    ]  # fmt: skip
    direct = {h: reaches_directly(ipaddress.ip_address(h), routes) for h in (
        "192.0.2.77",  # on eth0's subnet
        "198.51.100.7",  # only the default route: through the gateway
        "10.9.9.9",  # on eth1's /8
        "10.1.2.3",  # a more specific route through a gateway wins over the /8
        "10.2.0.1",  # a more specific reject route: not reachable at all
    )}  # fmt: skip
    assert direct == {
        "192.0.2.77": True, "198.51.100.7": False, "10.9.9.9": True, "10.1.2.3": False,
        "10.2.0.1": False,
    }  # fmt: skip
    assert reaches_directly(ipaddress.ip_address("192.0.2.77"), []) is False  # no route


def test_ipv6_routes_are_read_the_same_way():
    routes = ipv6_routes(IPV6_TABLE)
    assert reaches_directly(ipaddress.ip_address("fd00::42"), routes)
    assert not reaches_directly(ipaddress.ip_address("2001:db8::1"), routes)  # via fd00::1
    assert reaches_directly(ipaddress.ip_address("::1"), routes)


@given(st.lists(st.tuples(st.ip_addresses(v=4), st.integers(0, 32), st.booleans()), max_size=8))
def test_ipv4_route_lines_decode_to_the_networks_written(entries):
    def hexed(address):
        return f"{struct.unpack('=I', address.packed)[0]:08X}"

    lines = ["Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT"]
    networks = []
    for address, prefix, gateway in entries:
        network = ipaddress.IPv4Network(f"{address}/{prefix}", strict=False)
        networks.append((network, 0, 0x3 if gateway else 0x1))
        flags = "0003" if gateway else "0001"
        dest, mask = hexed(network.network_address), hexed(network.netmask)
        lines.append(f"e0\t{dest}\t00000000\t{flags}\t0\t0\t0\t{mask}\t0\t0\t0")
    assert ipv4_routes("\n".join(lines)) == networks


@linux
def test_loopback_peers_get_large_datagrams_and_others_the_floor():
    assert datagram_size("127.0.0.1") == AIOQUIC_MAX  # loopback's MTU is 64 KiB
    assert datagram_size("::ffff:127.0.0.1") == AIOQUIC_MAX  # as a dual-stack socket sees it
    assert datagram_size("127.0.0.1", limit=4000) == 4000
    assert datagram_size("not-an-address") == QUIC_MIN
    assert datagram_size("fe80::1") == QUIC_MIN  # link-local without a scope: no route known
    if _ipv6_loopback():
        assert datagram_size("::1") == AIOQUIC_MAX


def _ipv6_loopback() -> bool:
    """Whether ::1 is configured here (some containers have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@linux
async def test_both_sides_of_a_loopback_connection_send_large_datagrams(mesh):
    async with quic_pair(mesh) as p:
        conn = await p.connect()
        server_side = await connected(p.b, p.a.node_id)
        assert conn._carrier.datagram_size == AIOQUIC_MAX
        assert server_side._carrier.datagram_size == AIOQUIC_MAX
        # payloads far larger than one datagram, both ways (frames stay below aioquic's
        # two-byte frame length)
        x = torch.randn(1024, 1024)  # 4 MiB
        reply = await conn.request(Scale(Tensor.from_torch(x), 2.0), timeout=30)
        assert torch.equal(reply.y.torch(), x * 2)
        # both sockets asked for large buffers (bursts of large datagrams); Linux grants up to
        # net.core.rmem_max and reports twice what it granted
        rmem_max = RMEM_MAX
        for transport in (p.a._client_transports[conn], p.b._server._transport):
            granted = transport.get_extra_info("socket").getsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF
            )
            assert granted >= min(SOCKET_BUFFER, rmem_max)


needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not sys.platform.startswith("linux"),
    reason="network namespaces need root and ip",
)


@contextlib.contextmanager
def veth_namespaces():
    """Two fresh network namespaces joined by a veth pair (MTU 1500), 10.213.7.1 in the first
    and 10.213.7.2 in the second; removed afterwards."""
    tag = f"mdg{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"

    def ip(*args, check=True):
        subprocess.run(["ip", *args], check=check, capture_output=True)

    try:
        ip("netns", "add", a)
        ip("netns", "add", b)
        ip("link", "add", f"{tag}x", "mtu", "1500", "type", "veth", "peer", "name", f"{tag}y")
        ip("link", "set", f"{tag}x", "netns", a)
        ip("link", "set", f"{tag}y", "netns", b)
        for ns, dev, address in ((a, f"{tag}x", "10.213.7.1"), (b, f"{tag}y", "10.213.7.2")):
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in (a, b):  # deleting a namespace deletes its end of the veth pair too
            ip("netns", "del", ns, check=False)


@needs_netns
async def test_peers_across_a_veth_link_use_its_mtu():
    """Two processes in two network namespaces joined by a veth pair (MTU 1500): both sides of
    the connection send 1472-byte datagrams (1500 - IPv4 - UDP headers), and a 1 MiB payload
    crosses intact; an express lane's datagrams, larger than the MTU, cross it fragmented."""
    with veth_namespaces() as (a, b):
        mesh_id = new_mesh_id()
        peer = [sys.executable, "-m", "tests.transport.datagram_peer"]
        server = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", b, *peer, "serve", "10.213.7.2", mesh_id,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            async with asyncio.timeout(60):
                listening = json.loads(await server.stdout.readline())
                dialer = await asyncio.create_subprocess_exec(
                    "ip", "netns", "exec", a, *peer, "dial", "10.213.7.2",
                    str(listening["port"]), listening["id"], mesh_id,
                    stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, _ = await dialer.communicate()
                assert dialer.returncode == 0
                assert json.loads(out) == {
                    "client_datagram_size": 1472,
                    "echoed": True,
                    "lane_echoed": True,  # a 16 KB lane answer crossed the 1500-byte link
                }
                assert json.loads(await server.stdout.readline()) == {"server_datagram_size": 1472}
        finally:
            server.stdin.close()
            async with asyncio.timeout(10):
                await server.wait()
