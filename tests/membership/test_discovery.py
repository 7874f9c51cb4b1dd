"""LAN discovery: records from anyone on the LAN are read safely, and what they name is dialed
within bounds (a record proves nothing: any host can copy a mesh's public tag)."""

from __future__ import annotations

import asyncio
import logging
import socket

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from mesh_node.identity import MeshSecret, NodeId, NodeIdentity, new_mesh_id
from mesh_node.membership.discovery import (
    MAX_DIALS,
    MAX_WAITING,
    RETRY_AFTER,
    SERVICE_TYPE,
    DiscoveryDialer,
    MdnsDiscovery,
)
from mesh_node.membership.messages import Address
from tests.conditions import until

Added = ServiceStateChange.Added


def node_id() -> NodeId:
    return NodeIdentity.generate().node_id


class Joins:
    """A join that waits until the test lets it end, recording every dial."""

    def __init__(self) -> None:
        self.dialed: list[tuple[Address, NodeId]] = []
        self.outcome: dict[Address, asyncio.Future[bool]] = {}

    async def __call__(self, address: Address, expect: NodeId) -> bool:
        self.dialed.append((address, expect))
        future = self.outcome.setdefault(address, asyncio.get_running_loop().create_future())
        return await future

    def end(self, address: Address, joined: bool) -> None:
        self.outcome.setdefault(address, asyncio.get_running_loop().create_future())
        self.outcome[address].set_result(joined)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_records_with_made_up_ids_at_one_address_dial_it_one_at_a_time():
    joins = Joins()
    dialer = DiscoveryDialer(joins, allow_loopback=False)
    target = Address("192.0.2.7", 9)
    fakes = [node_id() for _ in range(50)]
    for fake in fakes:
        dialer.found(fake, [target])
    await settle()
    assert [a for a, _ in joins.dialed] == [target]  # one at a time per address
    assert dialer.waiting == MAX_WAITING  # the rest wait, within the bound
    joins.end(target, False)
    del joins.outcome[target]  # (the next dial there waits for its own outcome)
    await settle()
    assert len(joins.dialed) == 2  # the next waits its turn at that address
    dialer.found(fakes[0], [target])  # failed: not again before RETRY_AFTER
    await settle()
    assert sum(n == fakes[0] for _, n in joins.dialed) == 1
    await dialer.close()


async def test_a_made_up_record_at_a_real_nodes_address_does_not_shut_it_out():
    joins = Joins()
    dialer = DiscoveryDialer(joins, allow_loopback=False)
    address = Address("192.0.2.12", 7300)
    fake, real = node_id(), node_id()
    dialer.found(fake, [address])
    await settle()
    joins.end(address, False)  # the fake's join fails: the handshake proves another id
    await settle()
    del joins.outcome[address]
    dialer.found(real, [address])
    await settle()
    assert joins.dialed[-1] == (address, real)
    await dialer.close()


async def test_joins_in_flight_and_found_addresses_waiting_are_bounded():
    joins = Joins()
    dialer = DiscoveryDialer(joins, allow_loopback=False)
    addresses = [Address(f"198.51.100.{i}", 7300) for i in range(1, 101)]
    for address in addresses:
        dialer.found(node_id(), [address])
    await settle()
    assert len(joins.dialed) == dialer.dialing == MAX_DIALS
    assert dialer.waiting == MAX_WAITING
    assert dialer.refused == len(addresses) - MAX_DIALS - MAX_WAITING
    joins.end(addresses[0], True)  # one ends: the oldest waiting one is dialed in its place
    await settle()
    assert [a for a, _ in joins.dialed] == addresses[: MAX_DIALS + 1]
    assert dialer.dialing == MAX_DIALS and dialer.waiting == MAX_WAITING - 1
    await dialer.close()  # cancels the joins in flight and forgets the waiting ones
    assert dialer.dialing == 0 and dialer.waiting == 0
    dialer.found(node_id(), [Address("198.51.100.200", 7300)])
    await settle()
    assert len(joins.dialed) == MAX_DIALS + 1


async def test_a_failed_node_is_dialed_again_after_the_hold_off():
    now = [100.0]
    joins = Joins()
    dialer = DiscoveryDialer(joins, allow_loopback=False, clock=lambda: now[0])
    target, node = Address("192.0.2.8", 7300), node_id()
    dialer.found(node, [target])
    await settle()
    joins.end(target, False)
    await settle()
    del joins.outcome[target]
    now[0] += RETRY_AFTER - 1
    dialer.found(node, [target])
    await settle()
    assert len(joins.dialed) == 1
    now[0] += 2
    dialer.found(node, [target])
    await settle()
    assert len(joins.dialed) == 2
    await dialer.close()


async def test_addresses_no_peer_can_be_at_are_never_dialed():
    joins = Joins()
    dialer = DiscoveryDialer(joins, allow_loopback=False)
    unusable = [
        Address("0.0.0.0", 7300),
        Address("224.0.0.251", 5353),
        Address("255.255.255.255", 7300),
        Address("240.0.0.1", 7300),
        Address("127.0.0.1", 22),  # a service on this machine: not while discovery is on a LAN
        Address("192.0.2.9", 0),
        Address("not-an-address", 7300),
    ]
    for address in unusable:
        dialer.found(node_id(), [address])
    good = Address("192.0.2.10", 7300)
    dialer.found(node_id(), [*unusable, good])  # the first usable one is dialed
    await settle()
    assert [a for a, _ in joins.dialed] == [good]
    assert dialer.refused == len(unusable)
    await dialer.close()
    on_loopback = DiscoveryDialer(joins, allow_loopback=True)
    on_loopback.found(node_id(), [Address("127.0.0.1", 7300)])
    await settle()
    assert joins.dialed[-1][0] == Address("127.0.0.1", 7300)
    await on_loopback.close()


async def test_a_join_that_raises_counts_as_failed_and_frees_its_place(caplog):
    async def broken(address: Address, expect: NodeId) -> bool:
        raise RuntimeError("a bug")

    dialer = DiscoveryDialer(broken, allow_loopback=False)
    dialer.found(node_id(), [Address("192.0.2.11", 7300)])
    with caplog.at_level(logging.ERROR, logger="mesh_node.discovery"):
        await settle()
    assert dialer.dialing == 0
    assert "failed unexpectedly" in caplog.text
    await dialer.close()


async def test_hostile_records_on_the_lan_are_read_without_errors(caplog):
    """mDNS bound to 127.0.0.1 on both sides. Records with TXT bytes that are not UTF-8 (tag
    copied from the mesh), a bad node id and another mesh's tag are ignored, quietly; a good
    record of the mesh is handed on."""
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context["message"]))
    tag = MeshSecret(new_mesh_id()).discovery_tag
    found: list[tuple[NodeId, list[Address]]] = []
    me = node_id()
    mdns = MdnsDiscovery(
        me, 7300, ["127.0.0.1"], tag, lambda n, a: found.append((n, a)), interfaces=["127.0.0.1"]
    )
    other = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    peer = node_id()
    records = {
        "bad-bytes": {b"id": b"\xff\xfe", b"tag": tag.encode(), b"v": b"1"},
        "bad-key": {b"\xff": b"x", b"id": b"nonsense", b"tag": tag.encode(), b"v": b"1"},
        "other-mesh": {"id": str(node_id()), "tag": "0" * len(tag), "v": "1"},
        "good": {"id": str(peer), "tag": tag, "v": "1"},
    }
    caplog.set_level(logging.DEBUG, logger="mesh_node.discovery")
    await mdns.start()
    try:
        for name, properties in records.items():
            await other.async_register_service(
                AsyncServiceInfo(
                    SERVICE_TYPE,
                    f"{name}.{SERVICE_TYPE}",
                    addresses=[socket.inet_aton("127.0.0.1")],
                    port=7301,
                    properties=properties,
                )
            )
        await until(lambda: found, timeout=20, what="the good record")
        await until(
            lambda: caplog.text.count("has a bad node id") >= 2, timeout=20, what="bad ids read"
        )
        assert found == [(peer, [Address("127.0.0.1", 7301)])]
        assert errors == []
    finally:
        await mdns.stop()
        await other.async_close()
        loop.set_exception_handler(None)


async def test_records_looked_up_at_once_are_bounded():
    from mesh_node.membership.discovery import MAX_LOOKUPS

    mdns = MdnsDiscovery(node_id(), 7300, ["127.0.0.1"], "ab" * 16, lambda n, a: None)
    hold = asyncio.Event()

    async def slow_record(service_type: str, name: str) -> None:
        await hold.wait()

    mdns._read_record = slow_record
    for i in range(3 * MAX_LOOKUPS):  # a flood of announcements
        mdns._on_service_state_change(None, SERVICE_TYPE, f"n{i}.{SERVICE_TYPE}", Added)
    await settle()
    assert len(mdns._lookups) == MAX_LOOKUPS
    hold.set()
    await until(lambda: not mdns._lookups, what="lookups done")
