"""Nodes coming back, in virtual time: after a split or a crash longer than the tombstone
TTL (everyone forgot them), with the clock behind their previous run, when their first
advertised address is unreachable, after a failed fetch of their new state, and as two
processes with one key."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mesh_node.identity import MeshSecret, NodeIdentity, new_mesh_id
from mesh_node.membership.claims import ALIVE, DEAD, make_claim
from mesh_node.membership.messages import Address
from mesh_node.membership.swim import TWIN_HOLD, TWIN_REFUTATIONS, MembershipConfig, _TwinWatch
from tests.conditions import until
from tests.membership.mesh import CutLinkNetwork, SimMesh
from tests.membership.test_mesh_in_process import LAN, simulate

# tombstones forgotten after a simulated minute instead of a day; syncs every 2 s
SHORT_TTL = MembershipConfig(tombstone_ttl=60.0, sync_interval=2.0, reconnect_interval=2.0)
FORGOTTEN = 200.0  # > TTL + one reap tick (TTL / 10): every tombstone is forgotten by then


async def settles(mesh: SimMesh, predicate, timeout: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await mesh.wait_for(predicate, timeout)
        return True
    return False


def alive_views(mesh: SimMesh) -> dict[str, list[str]]:
    return {n.node_id.short: sorted(m.short for m in n.alive_ids()) for n in mesh.nodes}


def test_a_node_cut_off_longer_than_the_tombstone_ttl_rejoins_after_the_heal():
    """Both sides forget each other, the other's alive claims at or below the forgotten
    incarnations stay refused, and only the live nodes themselves can say they are back:
    the first to hear from a forgotten node tells it so, and it refutes."""

    async def check(mesh):
        island, rest = mesh.nodes[3], mesh.nodes[:3]
        mesh.network.partition([n.address for n in rest], [island.address])
        await asyncio.sleep(FORGOTTEN)
        assert all(n.status_of(island) is None for n in rest)
        assert island.alive_ids() == {island.node_id}
        mesh.network.heal()
        assert await settles(mesh, mesh.converged, 60), alive_views(mesh)

    simulate(check, nodes=4, config=SHORT_TTL)


def test_two_sides_split_longer_than_the_tombstone_ttl_merge_after_one_introduction():
    """Neither side knows where the other is any more; one join (as LAN discovery makes)
    is enough to bring all six back together."""

    async def check(mesh):
        a, b = mesh.nodes[:3], mesh.nodes[3:]
        mesh.network.partition([n.address for n in a], [n.address for n in b])
        await asyncio.sleep(FORGOTTEN)
        assert all(x.status_of(y) is None for x in a for y in b)
        mesh.network.heal()
        assert await a[0].membership.join(Address(*b[0].address), expect=b[0].node_id)
        assert await settles(mesh, mesh.converged, 60), alive_views(mesh)

    simulate(check, nodes=6, config=SHORT_TTL)


def test_a_node_restarted_with_its_clock_behind_after_its_tombstone_was_forgotten_rejoins():
    """Its first incarnation (its start time) is at or below the forgotten one."""
    import tests.membership.mesh as sim

    async def check(mesh):
        victim = mesh.nodes[3]
        mesh.crash(victim)
        await mesh.wait_for(lambda: all(n.status_of(victim) == DEAD for n in mesh.nodes), 20)
        await asyncio.sleep(FORGOTTEN)
        assert all(n.status_of(victim) is None for n in mesh.nodes)
        sim.BOOT_MS -= 60 * 60 * 1000  # an hour behind
        try:
            back = await mesh.add(identity=victim.identity)
        finally:
            sim.BOOT_MS += 60 * 60 * 1000
        assert await settles(mesh, mesh.converged, 30), alive_views(mesh)
        assert back.membership.incarnation > victim.membership.incarnation

    simulate(check, nodes=4, config=SHORT_TTL)


def test_a_failed_first_fetch_of_a_restarted_nodes_state_is_retried():
    """A node restarted with its clock behind publishes lower state versions than its past
    run; a peer whose first fetch of its new state failed fetches it again when the node
    next tells it its version (its probes do), or it would keep the past run's state."""
    import tests.membership.mesh as sim

    async def check(mesh):
        victim, observer = mesh.nodes[3], mesh.nodes[0]
        victim.membership.update_state(models_served=["old-model"])
        await mesh.wait_for(mesh.converged, 10)
        mesh.crash(victim)
        await mesh.wait_for(lambda: all(n.status_of(victim) == DEAD for n in mesh.nodes), 20)
        sim.BOOT_MS -= 10 * 60 * 1000
        try:
            back = await mesh.add(identity=victim.identity, seeds=[mesh.nodes[1].address])
        finally:
            sim.BOOT_MS += 10 * 60 * 1000
        mesh.network.cut(observer, back)  # a brief fault between the two, as it comes back
        await asyncio.sleep(2.0)
        held = observer.membership.table.get(back.node_id)
        assert held.incarnation == back.membership.incarnation  # its claims came round...
        assert held.state.models_served == ["old-model"]  # ...its state could not
        mesh.network.restore(observer, back)
        assert await settles(
            mesh, lambda: observer.membership.table.get(back.node_id).state.models_served == [], 30
        )

    simulate(check, nodes=4, network=CutLinkNetwork(LAN), seed=2)


def test_a_probe_reaches_a_node_at_its_second_address_within_the_probe_timeout():
    """No connection open yet: the first address, which never answers, must not take the
    whole probe timeout."""

    async def check(mesh):
        prober = await mesh.add(seeds=[], start=False)
        target = await mesh.add(seeds=[], start=False, unreachable=[Address("192.0.2.1", 7300)])
        addresses = target.membership.self_state.current.addresses
        assert len(addresses) == 2
        timeout = prober.membership.config.probe_timeout
        assert await prober.membership._ping(target.node_id, addresses, timeout)

    simulate(check, nodes=0)


def test_a_split_heals_when_every_nodes_first_advertised_address_is_unreachable():
    """Each node advertises first an address nobody can reach (a docker bridge, a VPN):
    probes, state fetches and syncs try the next address in time."""

    async def main(mesh):
        for i in range(6):
            await mesh.add(unreachable=[Address(f"192.0.2.{i + 1}", 7300)])
        await mesh.wait_for(mesh.converged, 30)
        a, b = mesh.nodes[:3], mesh.nodes[3:]
        mesh.network.partition([n.address for n in a], [n.address for n in b])
        await mesh.wait_for(lambda: all(x.status_of(y) == DEAD for x in a for y in b), 30)
        await asyncio.sleep(30)  # connections between the sides are gone
        mesh.network.heal()
        assert await settles(mesh, mesh.converged, 60), alive_views(mesh)

    simulate(main, nodes=0)


def test_another_process_with_the_same_key_is_reported_and_does_not_climb_forever(caplog):
    """An old process, frozen (not dead) while its replacement started, wakes: both speak
    for one node. They must not out-refute each other forever (the mesh's traffic for the
    node flipping between them): one says what is wrong and lets the other's claim stand."""

    async def check(mesh):
        old = mesh.nodes[3]
        rest = mesh.nodes[:3]
        mesh.network.partition([n.address for n in rest], [])  # the old process goes silent
        new = await mesh.add(identity=old.identity, seeds=[rest[0].address])
        mesh.network.partition([n.address for n in [*rest, new]], [old.address])
        await asyncio.sleep(20)
        before = new.membership.incarnation
        with caplog.at_level(logging.ERROR, "mesh_node.membership"):
            mesh.network.heal()  # the old process wakes up
            # the two find each other, and one gives way
            await until(lambda: "another process is running" in caplog.text, 60)
            settled_at = new.membership.incarnation
            addresses = set()
            for _ in range(60):
                await asyncio.sleep(1)
                addresses.add(tuple(rest[0].membership.table.get(new.node_id).addresses))
        assert new.membership.incarnation == settled_at and len(addresses) == 1
        assert settled_at - before <= 2 * TWIN_REFUTATIONS
        assert caplog.text.count("another process is running with this node's key") == 1

    simulate(check, nodes=4)


def test_alive_claims_above_us_are_refuted_unless_they_keep_coming(caplog):
    """Our past run leaves a claim or two above us: refuted. A third within a minute is a
    live twin: reported once, then left standing for a while, then refuted again."""
    identity = NodeIdentity.generate()
    tag = bytes.fromhex(MeshSecret(new_mesh_id()).discovery_tag)
    claim = make_claim(identity, tag, ALIVE, identity.node_id, 10, [Address("10.0.0.9", 7300)])
    now = [0.0]
    watch = _TwinWatch(lambda: now[0])
    with caplog.at_level(logging.ERROR, "mesh_node.membership"):
        for t in (0.0, 1.0, 100.0, 101.0):  # never three within TWIN_WINDOW
            now[0] = t
            assert watch.may_refute(claim, 5)
        assert caplog.text == ""
        now[0] = 102.0
        assert not watch.may_refute(claim, 5)
        assert "another process is running with this node's key" in caplog.text
        assert "10.0.0.9:7300" in caplog.text
        for t in (103.0, 102.0 + TWIN_HOLD - 1):
            now[0] = t
            assert not watch.may_refute(claim, 5)
        now[0] = 102.0 + TWIN_HOLD
        assert watch.may_refute(claim, 5)
    assert caplog.text.count("another process") == 1


def test_a_dead_nodes_address_taken_by_a_new_node_is_not_dialled_again_for_it(caplog):
    """A node dies and another (a new key: a restart without its identity, or another
    machine) starts at its address. Every member now and then tries its dead members, in
    case a split healed; at this address another node answers. That is said once per
    member, not every few seconds until the tombstone goes."""

    async def check(mesh):
        gone = mesh.nodes[3]
        address = gone.address
        mesh.crash(gone)
        members = list(mesh.nodes)
        await mesh.wait_for(lambda: all(n.status_of(gone) == DEAD for n in members), 60)
        with caplog.at_level(logging.INFO, "mesh_node.transport"):
            await mesh.add(address=address, seeds=[mesh.nodes[0].address])
            await asyncio.sleep(120)  # ~60 rounds of the reconnect loop on every node
        told = [r for r in caplog.records if "expected node " + gone.node_id.short in r.message]
        clients = [r for r in told if "client side" in r.message]
        # each of the 3 members that knew the dead one finds the newcomer there at most once
        assert 1 <= len(clients) <= 3, [r.message for r in told]
        assert all(n.status_of(gone) == DEAD for n in members)  # (its tombstone stays)

    simulate(check, nodes=4, config=MembershipConfig(reconnect_interval=2.0))
