"""A mesh member that lies: forged, replayed, stale, misattributed and oversized gossip and
state are refused, and a false accusation is refuted. (Outsiders cannot even connect: the
transport handshake requires the mesh secret.)"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest

from mesh_node.identity import MeshSecret, NodeIdentity, new_mesh_id
from mesh_node.membership import claims
from mesh_node.membership.claims import ALIVE, DEAD, LEFT, SUSPECT, make_claim
from mesh_node.membership.messages import (
    Address,
    Gossip,
    ModelInfo,
    Probe,
    ProbeRequest,
    StateDelta,
    StateRequest,
    SyncRequest,
)
from mesh_node.membership.swim import MembershipConfig
from mesh_node.protocol import REGISTRY
from mesh_node.transport.connection import Handlers
from mesh_node.transport.errors import ErrorCode, RemoteError
from mesh_node.transport.memory import MemoryNetwork
from tests.membership.mesh import SimMesh
from tests.membership.test_mesh_in_process import simulate


async def liar(mesh, handlers=None):
    """A node that holds the mesh secret but runs no membership: it says what it wants."""
    identity = NodeIdentity.generate()
    endpoint = mesh.network.endpoint(
        identity, mesh.mesh, registry=REGISTRY, handlers=handlers or Handlers()
    )
    await endpoint.start()
    return identity, endpoint


def tag(mesh):
    return bytes.fromhex(mesh.mesh.discovery_tag)


def test_forged_claims_are_rejected(caplog):
    async def check(mesh):
        victim, target = mesh.nodes[0], mesh.nodes[1]
        identity, endpoint = await liar(mesh)
        conn = await endpoint.connect(victim.address)
        honest_incarnation = victim.membership.table.get(target.node_id).incarnation
        # "target has left", signed by the liar: only a node can say it leaves
        forged_left = make_claim(identity, tag(mesh), LEFT, identity.node_id, honest_incarnation)
        forged_left = replace(forged_left, subject=target.node_id.key)
        # "target is dead at a huge incarnation" with a signature that is not the speaker's
        dead = make_claim(identity, tag(mesh), DEAD, target.node_id, 10**15)
        bad_sig = replace(dead, signature=bytes(64))
        # "target is alive somewhere else", claimed by the liar in the target's name
        fake_alive = make_claim(
            identity, tag(mesh), ALIVE, identity.node_id, 10**15, [Address("10.9.9.9", 1)]
        )
        fake_alive = replace(fake_alive, subject=target.node_id.key, speaker=target.node_id.key)
        with caplog.at_level(logging.WARNING, "mesh_node.membership"):
            await conn.send(Gossip([forged_left, bad_sig, fake_alive]), timeout=5)
            await asyncio.sleep(0.5)
        member = victim.membership.table.get(target.node_id)
        assert member.status == ALIVE and member.incarnation == honest_incarnation
        assert member.addresses == target.membership.self_state.current.addresses
        assert caplog.text.count("rejected a claim") == 3
        await endpoint.close()
        assert mesh.converged()

    simulate(check)


def statuses_of(victim, mesh) -> list[str]:
    """The statuses `victim` takes in any node's table from now on (filled as they change)."""
    seen: list[str] = []
    for node in mesh.nodes:
        node.membership.table.subscribe(
            lambda m, what: seen.append(m.status) if m.node_id == victim.node_id else None
        )
    return seen


def test_replayed_alive_claims_cannot_bring_back_the_dead():
    async def check(mesh):
        victim, observer = mesh.nodes[4], mesh.nodes[0]
        recorded = observer.membership.table.get(victim.node_id).alive_claim
        mesh.crash(victim)
        await mesh.wait_for(lambda: all(n.status_of(victim) == DEAD for n in mesh.nodes), 20)
        flickers = statuses_of(victim, mesh)
        _, endpoint = await liar(mesh)
        conn = await endpoint.connect(observer.address)
        await conn.send(Gossip([recorded]), timeout=5)  # stale but genuinely signed
        await asyncio.sleep(5)
        assert flickers == []  # not even for a moment
        assert all(n.status_of(victim) == DEAD for n in mesh.nodes)
        await endpoint.close()

    simulate(check)


def test_stale_claims_are_ignored():
    async def check(mesh):
        node, other = mesh.nodes[0], mesh.nodes[2]
        old = node.membership.table.get(other.node_id).alive_claim
        # the other node refutes a (true, signed) suspicion and moves to a higher incarnation
        accuser = mesh.nodes[3]
        suspicion = make_claim(accuser.identity, tag(mesh), SUSPECT, other.node_id, old.incarnation)
        _, endpoint = await liar(mesh)
        conn = await endpoint.connect(other.address)
        await conn.send(Gossip([suspicion]), timeout=5)
        await mesh.wait_for(
            lambda: all(
                n.membership.table.get(other.node_id).incarnation > old.incarnation
                and n.status_of(other) == ALIVE
                for n in mesh.nodes
            ),
            10,
        )
        # the old alive claim is stale now
        before = node.membership.table.digest()
        conn2 = await endpoint.connect(node.address)
        await conn2.send(Gossip([old]), timeout=5)
        await asyncio.sleep(1)
        assert node.membership.table.digest() == before
        await endpoint.close()

    simulate(check)


def test_a_false_accusation_is_refuted():
    async def check(mesh):
        target = mesh.nodes[1]
        before = target.membership.incarnation
        identity, endpoint = await liar(mesh)
        # a suspicion is the one thing others may say: the liar accuses the target
        accusation = make_claim(identity, tag(mesh), SUSPECT, target.node_id, before)
        conn = await endpoint.connect(mesh.nodes[3].address)
        await conn.send(Gossip([accusation]), timeout=5)
        await asyncio.sleep(10)
        assert target.membership.incarnation > before
        assert all(n.status_of(target) == ALIVE for n in mesh.nodes)
        await endpoint.close()

    simulate(check)


def test_state_is_accepted_only_from_its_own_node(caplog):
    async def check(mesh):
        victim, target = mesh.nodes[0], mesh.nodes[1]
        honest = victim.membership.table.get(target.node_id).state
        _, endpoint = await liar(mesh)
        conn = await endpoint.connect(victim.address)
        forged = StateDelta(
            node=target.node_id.key, base=honest.version, version=honest.version + 1, name="pwned"
        )
        with caplog.at_level(logging.WARNING, "mesh_node.membership"):
            await conn.send(forged, timeout=5)
            await asyncio.sleep(0.5)
        assert victim.membership.table.get(target.node_id).state == honest
        assert "a node speaks only for itself" in caplog.text
        await endpoint.close()

    simulate(check)


def test_a_state_answer_about_someone_else_is_rejected(caplog):
    async def check(mesh):
        victim, target = mesh.nodes[0], mesh.nodes[1]
        handlers = Handlers()

        def lie_about_target(ctx, request):
            state = victim.membership.table.get(target.node_id).state
            return replace(state, name="impostor", version=state.version + 100)

        handlers.on_request(StateRequest, lie_about_target)
        identity, endpoint = await liar(mesh, handlers)
        # announce itself properly (its own alive claim), then serve a lie when asked
        alive = make_claim(
            identity, tag(mesh), ALIVE, identity.node_id, 1, [Address(*endpoint.address)]
        )
        conn = await endpoint.connect(victim.address)
        with caplog.at_level(logging.WARNING, "mesh_node.membership"):
            await conn.send(Gossip([alive]), timeout=5)
            await asyncio.sleep(1)
        assert victim.membership.table.get(target.node_id).state.name != "impostor"
        assert victim.membership.table.get(identity.node_id).state is None
        assert "answered a state request with something else" in caplog.text
        await endpoint.close()

    simulate(check)


def test_oversized_gossip_and_state_are_refused(caplog):
    async def check(mesh):
        victim = mesh.nodes[0]
        limit = victim.membership.config.max_claims_per_message
        identity, endpoint = await liar(mesh)
        conn = await endpoint.connect(victim.address)
        alive = make_claim(
            identity, tag(mesh), ALIVE, identity.node_id, 1, [Address(*endpoint.address)]
        )
        before = victim.membership.table.digest()
        with caplog.at_level(logging.WARNING, "mesh_node.membership"):
            await conn.send(Gossip([alive] * (limit + 1)), timeout=5)
            await asyncio.sleep(0.5)
        assert victim.membership.table.digest() == before
        assert "dropped gossip" in caplog.text
        with pytest.raises(RemoteError) as refused:
            await conn.request(Probe(1, 0, [alive] * (limit + 1)), timeout=5)
        assert refused.value.code == ErrorCode.BAD_REQUEST
        # now a legitimate join, then an oversized state change
        await conn.send(Gossip([alive]), timeout=5)
        await asyncio.sleep(0.5)
        assert victim.membership.table.get(identity.node_id) is not None
        huge = [ModelInfo(f"m{i}", "llama", 1, 1) for i in range(300)]
        with caplog.at_level(logging.WARNING, "mesh_node.membership"):
            await conn.send(
                StateDelta(node=identity.node_id.key, base=0, version=5, models_on_disk=huge),
                timeout=5,
            )
            await conn.send(
                StateDelta(node=identity.node_id.key, base=0, version=6, name="x" * 500), timeout=5
            )
            await asyncio.sleep(0.5)
        assert caplog.text.count("rejected a state change") == 2
        assert victim.membership.table.get(identity.node_id).state is None
        await endpoint.close()

    simulate(check, config=MembershipConfig())


def test_an_indirect_probe_of_addresses_that_could_never_be_dialed_is_refused():
    async def check(mesh):
        victim, target = mesh.nodes[0], mesh.nodes[1]
        _, endpoint = await liar(mesh)
        conn = await endpoint.connect(victim.address)
        for bad in (Address("x" * 64 + ".example", 7300), Address("10.0.0.1", 70000)):
            with pytest.raises(RemoteError) as refused:
                await conn.request(ProbeRequest(target.node_id.key, [bad]), timeout=5)
            assert refused.value.code == ErrorCode.BAD_REQUEST
        addresses = list(target.membership.self_state.current.addresses)
        good = ProbeRequest(target.node_id.key, addresses)
        assert (await conn.request(good, timeout=5)).ok
        await endpoint.close()

    simulate(check)


def test_an_accusation_at_the_top_incarnations_cannot_shut_a_node_out(caplog):
    """Its subject refutes an accusation by going above it: one at the very top would leave
    it no valid alive claim, dead everywhere for good. Such claims are refused."""
    from mesh_node.membership.claims import MAX_ACCUSED, MAX_INCARNATION

    async def check(mesh):
        target = mesh.nodes[1]
        before = target.membership.incarnation
        identity, endpoint = await liar(mesh)
        conn = await endpoint.connect(mesh.nodes[3].address)
        for incarnation in (MAX_INCARNATION, MAX_ACCUSED + 1):
            accusation = make_claim(identity, tag(mesh), SUSPECT, target.node_id, incarnation)
            await conn.send(Gossip([accusation]), timeout=5)
        await asyncio.sleep(10)
        assert "must be at most" in caplog.text
        assert target.membership.incarnation == before
        assert all(n.status_of(target) == ALIVE for n in mesh.nodes)
        # at the highest incarnation one may accuse, its subject still refutes validly
        accusation = make_claim(identity, tag(mesh), SUSPECT, target.node_id, MAX_ACCUSED)
        await conn.send(Gossip([accusation]), timeout=5)
        await asyncio.sleep(10)
        assert target.membership.incarnation == MAX_ACCUSED + 1
        assert all(n.status_of(target) == ALIVE for n in mesh.nodes)
        await endpoint.close()

    simulate(check)


@pytest.mark.parametrize("gone", [DEAD, LEFT])
def test_suspicions_cannot_bring_back_a_dead_or_departed_node(gone):
    """Anyone with the mesh secret may suspect anyone, at any incarnation: suspicions, one a
    second at ever higher incarnations, must not make a dead or departed node live again
    (with its old state: the models it served), not even for a moment."""

    async def check(mesh):
        victim = mesh.nodes[4]
        victim.membership.update_state(models_served=["m"])
        await mesh.wait_for(mesh.converged, 10)
        if gone == DEAD:
            mesh.crash(victim)
        else:
            await mesh.leave(victim)
        await mesh.wait_for(lambda: all(n.status_of(victim) == gone for n in mesh.nodes), 20)
        changes = statuses_of(victim, mesh)
        identity, endpoint = await liar(mesh)
        conn = await endpoint.connect(mesh.nodes[0].address)
        incarnation = mesh.nodes[0].membership.table.get(victim.node_id).incarnation
        for step in range(1, 11):
            accusation = make_claim(
                identity, tag(mesh), SUSPECT, victim.node_id, incarnation + step
            )
            await conn.send(Gossip([accusation]), timeout=5)
            await asyncio.sleep(1)
        assert changes == []
        assert all(n.status_of(victim) == gone for n in mesh.nodes)
        await endpoint.close()

    simulate(check)


def test_suspicions_of_made_up_ids_add_no_members_and_deaths_only_tombstones():
    async def check(mesh):
        identity, endpoint = await liar(mesh)
        conn = await endpoint.connect(mesh.nodes[0].address)
        made_up = [NodeIdentity.generate().node_id for _ in range(20)]
        suspicions = [make_claim(identity, tag(mesh), SUSPECT, m, 5) for m in made_up]
        deaths = [make_claim(identity, tag(mesh), DEAD, m, 5) for m in made_up[:10]]
        await conn.send(Gossip(suspicions), timeout=5)
        await conn.send(Gossip(deaths), timeout=5)
        await asyncio.sleep(1)
        for node in mesh.nodes:
            table = node.membership.table
            assert len(table.live_peers()) == 4
            assert sorted(m.status for m in table if m.node_id in made_up) == [DEAD] * 10
        assert mesh.converged()
        await endpoint.close()

    simulate(check)


def test_a_replayed_alive_claim_does_not_bring_back_a_forgotten_node():
    """A forgotten node comes back only by speaking for itself (it is then told to refute):
    a genuine copy of its old alive claim, handed over by anyone else, does not do it."""

    async def check(mesh):
        victim = mesh.nodes[4]
        recorded = mesh.nodes[0].membership.table.get(victim.node_id).alive_claim
        mesh.crash(victim)
        await mesh.wait_for(lambda: all(n.status_of(victim) == DEAD for n in mesh.nodes), 20)
        await asyncio.sleep(200)  # > the TTL and a reap tick: forgotten everywhere
        assert all(n.status_of(victim) is None for n in mesh.nodes)
        _, endpoint = await liar(mesh)
        for node in mesh.nodes:
            conn = await endpoint.connect(node.address)
            await conn.send(Gossip([recorded]), timeout=5)
        await asyncio.sleep(5)
        assert all(n.status_of(victim) is None for n in mesh.nodes)
        await endpoint.close()

    simulate(check, config=MembershipConfig(tombstone_ttl=60.0, sync_interval=2.0))


async def test_a_large_view_exchange_lets_the_node_run_between_its_signature_checks(monkeypatch):
    """A SyncRequest may carry 2 * max_members claims, each a signature to check (8192: ~1.6 s
    of CPU): the node's other tasks run between slices of them, not after all."""
    checks = {"since_tick": 0, "most": 0}
    verify = claims.Verifier.verify

    def counted(self, mesh_tag, claim):
        checks["since_tick"] += 1
        checks["most"] = max(checks["most"], checks["since_tick"])
        return verify(self, mesh_tag, claim)

    monkeypatch.setattr(claims.Verifier, "verify", counted)
    mesh = SimMesh(MemoryNetwork(), MeshSecret(new_mesh_id()), MembershipConfig())
    victim, sender = await mesh.add(seeds=[], start=False), NodeIdentity.generate()
    others = [NodeIdentity.generate() for _ in range(600)]
    tag = victim.membership.mesh_tag
    news = [make_claim(o, tag, ALIVE, o.node_id, 1, [Address("10.9.0.1", 1)]) for o in others]

    async def tick():
        while True:
            checks["since_tick"] = 0
            await asyncio.sleep(0)

    ticker = asyncio.ensure_future(tick())
    try:
        context = SimpleNamespace(peer=sender.node_id)
        reply = victim.membership._on_sync(context, SyncRequest(b"", news))
        reply = await reply if inspect.isawaitable(reply) else reply  # (a handler may be either)
    finally:
        ticker.cancel()
    assert len(reply.claims) == 601  # the victim's view: itself and every claim it was sent
    assert checks["most"] <= 32, checks
    await victim.endpoint.close()
