"""The rules of the SWIM/Lifeguard failure detector, one at a time: indirect probes spare a
node that only we cannot reach, the suspicion timeout scales with the mesh's size and
shrinks with confirmations (PROTOCOL.md: `max(1 s, 4 * log10(N) * 0.5 s)` when confirmed,
up to 3x that alone), and local health stretches the probe interval and falls again after
successful probes. Everything runs in virtual time or calls the functions directly."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest

from mesh_node.identity import MeshSecret, NodeIdentity, new_mesh_id
from mesh_node.membership.claims import ALIVE, DEAD, SUSPECT, make_claim
from mesh_node.membership.swim import MembershipConfig
from mesh_node.membership.table import STATUS
from mesh_node.transport import virtual_time
from mesh_node.transport.memory import MemoryNetwork
from tests.membership.mesh import CutLinkNetwork, SimMesh, SimNode

LAN = 0.0005  # one-way latency of the simulated LAN, seconds


def new_mesh(network: MemoryNetwork | None = None, config: MembershipConfig | None = None):
    return SimMesh(
        network or CutLinkNetwork(LAN),
        MeshSecret(new_mesh_id()),
        config or MembershipConfig(),
        seed=5,
    )


async def quiet_node(mesh: SimMesh) -> SimNode:
    """A node whose background loops do not run: only what a test calls does (it still
    answers probes and probe requests). SimMesh.add(start=False) starts the loops all the
    same (its `start` parameter is overwritten by the start time), so stop them here."""
    node = await mesh.add(seeds=[], start=False)
    await node.membership.stop()
    return node


async def introduced(mesh: SimMesh, count: int) -> list[SimNode]:
    """`count` quiet nodes that know each other."""
    nodes = [await quiet_node(mesh) for _ in range(count)]
    for node in nodes:
        for other in nodes:
            node.membership.table.apply(other.membership.table.get(other.node_id).alive_claim)
            node.membership.table.apply_state(other.membership.self_state.current)
    return nodes


async def with_peers(mesh: SimMesh, peers: int) -> tuple[SimNode, list[NodeIdentity]]:
    """A quiet node whose table holds `peers` other live members (a mesh of N = peers + 1)."""
    node = await quiet_node(mesh)
    others = [NodeIdentity.generate() for _ in range(peers)]
    tag = node.membership.mesh_tag
    for other in others:
        node.membership.table.apply(make_claim(other, tag, ALIVE, other.node_id, 1))
    return node, others


def documented_floor(n: int) -> float:
    """PROTOCOL.md: a confirmed suspicion becomes dead after max(1 s, 4 * log10(N) * 0.5 s)."""
    return max(1.0, 4 * math.log10(n) * 0.5)


# ---------------------------------------------------------------------- indirect probes


def test_a_node_reachable_only_through_another_is_never_suspected():
    """A cannot reach C, B reaches both: B's indirect probes answer for C, so for a simulated
    minute neither A nor C suspects the other (SWIM's point of indirect probing)."""

    async def main():
        network = CutLinkNetwork(LAN)
        mesh = new_mesh(network)
        for _ in range(3):
            await mesh.add()
        try:
            await mesh.wait_for(mesh.converged, timeout=10)
            a, _, c = mesh.nodes
            accused = []
            for node in mesh.nodes:
                node.membership.table.subscribe(
                    lambda m, what, accused=accused: (
                        accused.append((m.node_id.short, m.status))
                        if what == STATUS and m.status != ALIVE
                        else None
                    )
                )
            helped = []
            ask_helper = a.membership._ask_helper

            async def counting_ask_helper(helper, request, timeout):
                result = await ask_helper(helper, request, timeout)
                helped.append(result)
                return result

            a.membership._ask_helper = counting_ask_helper
            network.cut(a, c)
            await asyncio.sleep(60)
            assert True in helped  # A did probe C, and only through B did it get an answer
            assert accused == []
            assert a.status_of(c) == ALIVE and c.status_of(a) == ALIVE
        finally:
            await mesh.stop()

    virtual_time.run(main())


def probe_once(helper_reaches_target: bool) -> tuple[str | None, int]:
    """Three nodes, A unable to reach C directly (and B too, unless `helper_reaches_target`):
    A's status of C and A's health after one `_probe` of C."""

    async def main():
        network = CutLinkNetwork(LAN)
        mesh = new_mesh(network)
        try:
            a, b, c = await introduced(mesh, 3)
            network.cut(a, c)
            if not helper_reaches_target:
                network.cut(b, c)
            loop = asyncio.get_running_loop()
            member = a.membership.table.get(c.node_id)
            await a.membership._probe(member, loop.time() + a.membership.config.probe_interval)
            return a.status_of(c), a.membership.health
        finally:
            await mesh.stop()

    return virtual_time.run(main())


def test_one_probe_answered_through_a_helper_leaves_the_target_alive_and_health_alone():
    """The same rule on one `_probe` call: a direct failure followed by a helper's ack is no
    reason to suspect the target, nor to raise our local health."""
    assert probe_once(helper_reaches_target=True) == (ALIVE, 0)


def test_a_target_that_no_helper_reaches_either_is_suspected():
    """The control for the tests above: when the helper cannot reach the target either, the
    target is suspected and our health rises by one, for the failed probe alone: the
    helper's "no" (it tries for 80% of a probe timeout) comes within our probe interval, so
    it is not counted as a helper that did not answer (which would add one more)."""
    assert probe_once(helper_reaches_target=False) == (SUSPECT, 1)


# ---------------------------------------------------------------------- suspicion timeout


@pytest.mark.parametrize("n", [2, 3, 4, 10, 100])
async def test_the_suspicion_timeout_spans_the_documented_bounds_for_the_mesh_size(n):
    """Unconfirmed: 3x the floor; confirmed by as many members as Lifeguard expects (3, or
    fewer in a tiny mesh) or more: the floor, max(1 s, 4 * log10(N) * 0.5 s), which grows
    with N, the members counting ourselves."""
    mesh = new_mesh()
    try:
        node, _ = await with_peers(mesh, n - 1)
        floor = documented_floor(n)
        expected = max(1, min(3, n - 2))  # confirmations that bring it down to the floor
        timeout = node.membership._suspicion_timeout
        assert timeout(0) == pytest.approx(3 * floor)
        assert timeout(expected) == pytest.approx(floor)
        assert timeout(expected + 5) == pytest.approx(floor)
    finally:
        await mesh.stop()


async def test_each_confirmation_shortens_the_suspicion_timeout_by_lifeguards_formula():
    """N = 10: floor 2 s, ceiling 6 s, 3 confirmations expected. Lifeguard's timeout is
    max(floor, ceiling - (ceiling - floor) * log(C + 1) / log(3 + 1)) for C confirmations."""
    mesh = new_mesh()
    try:
        node, _ = await with_peers(mesh, 9)
        timeout = node.membership._suspicion_timeout
        got = [timeout(c) for c in range(6)]
        lifeguard = [6.0, 4.0, 6.0 - 4.0 * math.log(3) / math.log(4), 2.0, 2.0, 2.0]
        assert got == pytest.approx(lifeguard)
    finally:
        await mesh.stop()


def test_a_suspicion_confirmed_by_three_members_expires_at_the_floor():
    """In a mesh of 10, our own suspicion plus three others' is declared dead 2 s after the
    suspicion began (not 6 s as if unconfirmed, nor the 1 s floor of a tiny mesh)."""
    assert simulate_suspicion(peers=9, confirmations=3) == pytest.approx(2.0)


def test_an_unconfirmed_suspicion_expires_at_three_times_the_floor_for_the_mesh_size():
    """In a mesh of 100, a suspicion nobody confirms is declared dead after 3 * 4 s."""
    assert simulate_suspicion(peers=99, confirmations=0) == pytest.approx(12.0)


def simulate_suspicion(peers: int, confirmations: int) -> float:
    """Seconds (virtual) from our suspicion of one peer, confirmed by `confirmations` others
    at once, to our declaring it dead."""

    async def main():
        mesh = new_mesh()
        try:
            node, others = await with_peers(mesh, peers)
            membership = node.membership
            target = others[0].node_id
            died = asyncio.Event()
            membership.table.subscribe(
                lambda m, what: died.set() if m.node_id == target and m.status == DEAD else None
            )
            loop = asyncio.get_running_loop()
            began = loop.time()
            membership._suspect(membership.table.get(target))
            membership.accept_claims(
                [
                    make_claim(o, membership.mesh_tag, SUSPECT, target, 1)
                    for o in others[1 : 1 + confirmations]
                ],
                others[-1].node_id,  # relayed by another member
            )
            async with asyncio.timeout(60):
                await died.wait()
            return loop.time() - began
        finally:
            await mesh.stop()

    return virtual_time.run(main())


# ---------------------------------------------------------------------- local health


@pytest.mark.parametrize("health", [1, 3, 8])
def test_the_probe_interval_stretches_with_local_health(health):
    """A node whose health score is h probes every probe_interval * (1 + h), and gives each
    probe that long (its deadline for indirect probes), so a slow node accuses less."""
    config = MembershipConfig(lag_interval=0)  # nothing but the test moves the health score

    async def main():
        mesh = new_mesh(config=config)
        try:
            a, _ = await introduced(mesh, 2)
            membership = a.membership
            membership.health = health
            loop = asyncio.get_running_loop()
            probes: list[tuple[float, float]] = []
            enough = asyncio.Event()

            async def recording_probe(member, deadline):
                probes.append((loop.time(), deadline))
                if len(probes) == 4:
                    enough.set()

            membership._probe = recording_probe
            membership._running = True
            loop_task = asyncio.create_task(membership._probe_loop())
            try:
                async with asyncio.timeout(60):
                    await enough.wait()
            finally:
                membership._running = False
                loop_task.cancel()
                await asyncio.gather(loop_task, return_exceptions=True)
            return probes
        finally:
            await mesh.stop()

    probes = virtual_time.run(main())
    interval = config.probe_interval * (1 + health)
    starts = [at for at, _ in probes]
    assert [b - a for a, b in itertools.pairwise(starts)] == pytest.approx([interval] * 3)
    assert [deadline - at for at, deadline in probes] == pytest.approx([interval] * 4)


def test_each_successful_probe_lowers_local_health_by_one_down_to_zero():
    """Lifeguard: a direct ack is evidence that we are healthy again; health 3 falls to 2,
    1, 0 over three probes and stays at 0."""

    async def main():
        mesh = new_mesh()
        try:
            a, b = await introduced(mesh, 2)
            membership = a.membership
            membership.health = 3
            loop = asyncio.get_running_loop()
            seen = []
            for _ in range(4):
                member = membership.table.get(b.node_id)
                await membership._probe(member, loop.time() + membership.config.probe_interval)
                seen.append(membership.health)
            assert a.status_of(b) == ALIVE
            return seen
        finally:
            await mesh.stop()

    assert virtual_time.run(main()) == [2, 1, 0, 0]


def test_a_node_at_maximum_health_recovers_to_zero_in_a_healthy_mesh():
    """A node that was loaded (health at its ceiling) in a mesh where every probe succeeds
    comes back to full speed: its health reaches 0 within a bounded (simulated) time, never
    rising on the way (sampled at every change to its table, probe answers included)."""

    async def main():
        mesh = new_mesh(config=MembershipConfig(lag_interval=0))
        for _ in range(3):
            await mesh.add()
        try:
            await mesh.wait_for(mesh.converged, timeout=10)
            membership = mesh.nodes[0].membership
            membership.health = membership.config.max_health
            seen = [membership.health]

            def recovered() -> bool:
                if membership.health != seen[-1]:
                    seen.append(membership.health)
                return membership.health == 0

            # one probe a (stretched) interval: 0.5 * (9 + 8 + ... + 2) = 22 s to get down
            await mesh.wait_for(recovered, timeout=60)
            return seen
        finally:
            await mesh.stop()

    seen = virtual_time.run(main())
    assert seen == sorted(seen, reverse=True)
    assert seen[0] == 8 and seen[-1] == 0
