"""Addresses beyond one IPv4 loopback: nodes in network namespaces on a private bridge with
IPv6 addresses only, joining through bracketed --peer addresses."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mesh_node.identity import new_mesh_id
from tests.processes.nodes import NodeProcess, stop_all

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not sys.platform.startswith("linux"),
    reason="network namespaces need root and ip",
)


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=10)


@contextlib.contextmanager
def bridged_namespaces(addresses: list[str | tuple[str, ...]]):
    """A fresh network namespace per item of `addresses` with that address (or those, the
    first the primary one; each with its prefix, e.g. 'fd00::1/64'), each joined by a veth
    pair to a bridge in one more namespace of its own; all removed afterwards. Nothing is
    added to the test's own namespace."""
    tag = f"n6{os.getpid() % 100000}"
    hub = f"{tag}h"
    spaces = [f"{tag}{i}" for i in range(len(addresses))]
    try:
        for ns in (hub, *spaces):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", hub, "link", "add", "bridge0", "type", "bridge")
        ip("-n", hub, "link", "set", "bridge0", "up")
        for i, (ns, given) in enumerate(zip(spaces, addresses, strict=True)):
            ip("link", "add", f"{tag}e{i}", "type", "veth", "peer", "name", f"{tag}p{i}")
            ip("link", "set", f"{tag}e{i}", "netns", ns)
            ip("link", "set", f"{tag}p{i}", "netns", hub)
            ip("-n", hub, "link", "set", f"{tag}p{i}", "master", "bridge0", "up")
            for address in (given,) if isinstance(given, str) else given:
                extra = ["nodad"] if ":" in address else []  # (usable at once)
                ip("-n", ns, "addr", "add", address, "dev", f"{tag}e{i}", *extra)
            ip("-n", ns, "link", "set", f"{tag}e{i}", "up")
        yield spaces
    finally:
        for ns in (*spaces, hub):  # (a namespace takes its ends of the veth pairs with it)
            ip("netns", "del", ns, check=False)


@needs_netns
async def test_nodes_listening_on_all_ipv6_interfaces_reach_each_other_directly():
    """Three IPv6-only hosts, every node on `--host ::`: each advertises its IPv6 address, so
    the two that joined through the first connect to each other directly (they advertised
    127.0.0.1, the only IPv4 address they had: each dialed itself there, twice a second with a
    warning, never learned the other's state, and the two were cut off should the first go)."""
    mesh_id = new_mesh_id()
    nodes: list[NodeProcess] = []
    with bridged_namespaces(["fd00::1/64", "fd00::2/64", "fd00::3/64"]) as spaces:
        try:
            for i, ns in enumerate(spaces):
                seed = ("--peer", "[fd00::1]:7300") if i else ()
                nodes.append(
                    await NodeProcess.join(
                        mesh_id, "--client", "--host", "::", "--port", "7300", *seed,
                        prefix=("ip", "netns", "exec", ns),
                    )
                )  # fmt: skip
            _, second, third = nodes
            await second.wait_log(rf"connection with {third.node_id.short} \(fd00::3:", 15)
            await third.wait_log(rf"node {second.node_id.short} is alive", 5)
        finally:
            await stop_all(nodes)
        for node in nodes:
            assert not any("SELF_CONNECTION" in line for line in node.stderr_lines)


@needs_netns
@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
async def test_a_node_with_two_addresses_answers_from_the_one_dialed(host):
    """A node on all interfaces with a second address on its interface (10.61.1.5 beside
    10.61.1.1, fd00::5 beside fd00::1), dialed at the second one: it answers from there (it
    answered from the address the kernel picked for the way back, the first, and the
    dialer's QUIC dropped what came from an address it had not dialed: no join, ever). A node
    on '::' dials IPv4 addresses too (it bound the socket it dials them from to '::')."""
    mesh_id = new_mesh_id()
    nodes: list[NodeProcess] = []
    first = ("10.61.1.1/24", "10.61.1.5/24", "fd00::1/64", "fd00::5/64")
    with bridged_namespaces([first, ("10.61.1.2/24",), ("fd00::3/64",)]) as spaces:
        joiners = [(spaces[1], host, "10.61.1.5:7300")]  # (on '::', it calls IPv4 too)
        if host == "::":
            joiners.append((spaces[2], "::", "[fd00::5]:7300"))
        try:
            for ns, own, seed in [(spaces[0], host, None), *joiners]:
                nodes.append(
                    await NodeProcess.join(
                        mesh_id, "--client", "--host", own, "--port", "7300",
                        *(("--peer", seed) if seed else ()),
                        prefix=("ip", "netns", "exec", ns),
                    )
                )  # fmt: skip
            for node, (_, _, seed) in zip(nodes[1:], joiners, strict=True):
                short = nodes[0].node_id.short
                await node.wait_log(rf"joined through {short} \({re.escape(seed)}\)", 10)
        finally:
            await stop_all(nodes)


@contextlib.contextmanager
def namespace_with_hosts(hosts: str):
    """A fresh network namespace (loopback only) whose processes, run with `ip netns exec`,
    read `hosts` as /etc/hosts (ip mounts /etc/netns/NAME/hosts there); removed afterwards."""
    ns = f"n6{os.getpid() % 100000}n"
    folder = Path("/etc/netns") / ns
    try:
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        folder.mkdir(parents=True)
        (folder / "hosts").write_text(hosts)
        yield ns
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # (only when empty: another namespace may use it)
        ip("netns", "del", ns, check=False)


@needs_netns
async def test_a_peer_named_with_several_addresses_is_dialed_at_each():
    """`--peer localhost:7300` where localhost is ::1 first and then 127.0.0.1 (Debian's and
    Ubuntu's /etc/hosts), to a node on IPv4: the second address answers (only the first was
    dialed: 'no answer from localhost:7300', for ever)."""
    mesh_id = new_mesh_id()
    nodes: list[NodeProcess] = []
    with namespace_with_hosts("::1 localhost\n127.0.0.1 localhost\n") as ns:
        try:
            for extra in (("--port", "7300"), ("--peer", "localhost:7300")):
                nodes.append(
                    await NodeProcess.join(
                        mesh_id, "--client", *extra, prefix=("ip", "netns", "exec", ns)
                    )
                )
            await nodes[1].wait_log(rf"joined through {nodes[0].node_id.short} ", 10)
        finally:
            await stop_all(nodes)
