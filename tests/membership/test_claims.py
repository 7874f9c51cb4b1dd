"""Claims (signatures, shapes, precedence) and the peer table, without a network."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_node.identity import MeshSecret, NodeIdentity, new_mesh_id
from mesh_node.membership.claims import (
    ALIVE,
    DEAD,
    LEFT,
    SUSPECT,
    Verifier,
    make_claim,
    outranks,
    shape_error,
)
from mesh_node.membership.messages import Address, PeerState, StateDelta
from mesh_node.membership.table import PeerTable

TAG = bytes.fromhex(MeshSecret(new_mesh_id()).discovery_tag)
SUBJECT = NodeIdentity.generate()
OTHERS = [NodeIdentity.generate() for _ in range(3)]
ADDR = [Address("10.0.0.1", 7300)]


def claim(kind, inc, speaker=None):
    speaker = speaker or (SUBJECT if kind in (ALIVE, LEFT) else OTHERS[0])
    return make_claim(speaker, TAG, kind, SUBJECT.node_id, inc, ADDR if kind == ALIVE else [])


def test_signatures_bind_every_field_and_the_mesh():
    verifier = Verifier()
    good = claim(ALIVE, 5)
    assert verifier.verify(TAG, good)
    from dataclasses import replace

    for tampered in (
        replace(good, incarnation=6),
        replace(good, kind=LEFT, addresses=[]),
        replace(good, addresses=[Address("10.6.6.6", 7300)]),
    ):
        assert not verifier.verify(TAG, tampered)
    other_mesh = bytes.fromhex(MeshSecret(new_mesh_id()).discovery_tag)
    assert not verifier.verify(other_mesh, good)


def test_shape_rules():
    assert shape_error(claim(ALIVE, 1)) is None
    assert shape_error(claim(SUSPECT, 1)) is None
    from dataclasses import replace

    assert "spoken by its subject" in shape_error(claim(ALIVE, 1, speaker=OTHERS[1]))
    assert "spoken by another node" in shape_error(claim(SUSPECT, 1, speaker=SUBJECT))
    assert "addresses" in shape_error(replace(claim(ALIVE, 1), addresses=[]))
    assert "unknown claim kind" in shape_error(replace(claim(ALIVE, 1), kind="zombie"))
    assert "32 bytes" in shape_error(replace(claim(ALIVE, 1), subject=b"x"))
    many = [Address("10.0.0.1", 7300 + i) for i in range(9)]
    assert "addresses" in shape_error(replace(claim(ALIVE, 1), addresses=many))


@pytest.mark.parametrize(
    "new, old, wins",
    [
        ((SUSPECT, 3), (ALIVE, 3), True),
        ((ALIVE, 3), (SUSPECT, 3), False),
        ((ALIVE, 4), (SUSPECT, 3), True),  # refutation
        ((DEAD, 3), (SUSPECT, 3), True),
        ((ALIVE, 3), (DEAD, 3), False),  # a tombstone holds against the same incarnation
        ((ALIVE, 4), (DEAD, 3), True),  # ...and is lifted by a rejoin
        ((SUSPECT, 3), (DEAD, 3), False),
        ((LEFT, 3), (DEAD, 3), True),
        ((DEAD, 3), (LEFT, 3), False),
        ((ALIVE, 2), (ALIVE, 3), False),
        ((SUSPECT, 4), (DEAD, 3), False),  # only alive lifts a tombstone...
        ((SUSPECT, 4), (LEFT, 3), False),
        ((DEAD, 4), (LEFT, 3), True),  # ...while a higher tombstone replaces one
    ],
)
def test_precedence(new, old, wins):
    assert outranks(*new, *old) is wins


KIND = st.sampled_from([ALIVE, SUSPECT, DEAD, LEFT])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([ALIVE, DEAD, LEFT]), st.integers(1, 4)), min_size=1, max_size=6
    ),
    st.randoms(),
)
def test_the_view_does_not_depend_on_arrival_order(events, rnd):
    """Of alive, dead and left claims, the view holds the highest whatever their order.
    (Suspicions are dropped when their subject is not live in the view, so the view does
    depend on whether one came before or after: the next test.)"""
    claims = [claim(kind, inc) for kind, inc in events]
    results = set()
    for order in itertools.islice(itertools.permutations(claims), 6):
        order = list(order)
        rnd.shuffle(order)
        table = PeerTable(OTHERS[2].node_id, lambda: 0.0)
        for c in order:
            table.apply(c)
        member = table.get(SUBJECT.node_id)
        results.add(None if member is None else (member.status, member.incarnation))
    assert len(results) == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(KIND, st.integers(1, 4)), min_size=1, max_size=8))
def test_only_alive_at_a_higher_incarnation_lifts_a_tombstone(events):
    """Whatever comes in whatever order: a suspicion never makes a member, a tombstone
    stays one until alive above its incarnation, and a suspicion is held only of a node
    whose alive claim the table holds."""
    table = PeerTable(OTHERS[2].node_id, lambda: 0.0)
    for kind, inc in events:
        before = table.get(SUBJECT.node_id)
        before = None if before is None else (before.status, before.incarnation)
        table.apply(claim(kind, inc))
        member = table.get(SUBJECT.node_id)
        if before is None:
            assert member is None or member.status != SUSPECT
        elif before[0] in (DEAD, LEFT) and member.live:
            assert kind == ALIVE and inc > before[1]
        if member is not None and member.status == SUSPECT:
            assert member.alive_claim is not None


def test_suspicions_of_unknown_nodes_are_dropped_and_deaths_kept_as_tombstones():
    """Anyone may suspect a made-up id: that adds no member. A death adds a tombstone, never
    a live member: a node joining late learns the dead only so (a view carries a dead
    member's death, not its alive claim), and views must agree (their digests)."""
    table = PeerTable(OTHERS[2].node_id, lambda: 0.0)
    for made_up in (NodeIdentity.generate() for _ in range(5)):
        suspicion = make_claim(OTHERS[0], TAG, SUSPECT, made_up.node_id, 5)
        assert table.apply(suspicion) is None and table.get(made_up.node_id) is None
    assert len(table) == 0
    tombstone = table.apply(claim(DEAD, 3))
    assert tombstone is not None and tombstone.status == DEAD and not tombstone.live
    assert table.live_peers() == []
    table.apply(claim(ALIVE, 3))  # an alive claim of that incarnation does not lift it
    assert table.apply(claim(SUSPECT, 9)) is None  # nor does a suspicion of a later one
    assert table.get(SUBJECT.node_id).status == DEAD and table.live_peers() == []
    back = table.apply(claim(ALIVE, 4))
    assert back is not None and back.status == ALIVE


def state(version, **extra):
    return PeerState(
        node=SUBJECT.node_id.key,
        version=version,
        incarnation=1,
        **{"name": "n", "software": "s", "role": "worker", "addresses": ADDR, **extra},
    )


def test_states_only_move_forward_and_deltas_need_their_base():
    table = PeerTable(OTHERS[2].node_id, lambda: 0.0)
    assert not table.apply_state(state(5))  # unknown node: nothing to attach it to
    table.apply(claim(ALIVE, 1))
    assert table.apply_state(state(5))
    assert not table.apply_state(state(4))
    delta = StateDelta(node=SUBJECT.node_id.key, base=5, version=6, name="renamed")
    assert table.apply_delta(delta) == "applied"
    assert table.get(SUBJECT.node_id).state.name == "renamed"
    assert table.apply_delta(delta) == "stale"
    gap = StateDelta(node=SUBJECT.node_id.key, base=8, version=9, name="x")
    assert table.apply_delta(gap) == "gap"
    table.apply(claim(DEAD, 1))
    assert not table.apply_state(state(10))  # no state for the dead


def test_tombstones_are_reaped_after_their_ttl():
    now = [0.0]
    table = PeerTable(OTHERS[2].node_id, lambda: now[0], tombstone_ttl=100)
    table.apply(claim(ALIVE, 1))
    table.apply(claim(DEAD, 1))
    now[0] = 50
    assert table.reap() == [] and len(table) == 1
    now[0] = 101
    assert [m.node_id for m in table.reap()] == [SUBJECT.node_id]
    assert table.get(SUBJECT.node_id) is None


def test_digest_reflects_status_and_incarnation():
    a = PeerTable(OTHERS[2].node_id, lambda: 0.0)
    b = PeerTable(OTHERS[1].node_id, lambda: 0.0)
    for table in (a, b):
        table.apply(claim(ALIVE, 1))
    assert a.digest() == b.digest()
    a.apply(claim(SUSPECT, 1))
    assert a.digest() != b.digest()
    b.apply(claim(SUSPECT, 1, speaker=OTHERS[1]))
    assert a.digest() == b.digest()  # who accuses does not matter to the digest


def test_the_machine_label_is_the_kernel_boot_id_hashed(tmp_path):
    from mesh_node.membership.state import machine_id, state_error

    boot = tmp_path / "boot_id"
    boot.write_text("0b6a3c3e-1d2f-4a5b-9c8d-7e6f5a4b3c2d\n")
    label = machine_id(str(boot))
    assert len(label) == 16 and int(label, 16) >= 0
    assert machine_id(str(boot)) == label  # every process under one kernel: the same
    assert "0b6a3c3e" not in label
    boot.write_text("5e1f0d2c-3b4a-4968-8776-655443322110\n")
    assert machine_id(str(boot)) != label  # another kernel (machine, or a reboot)
    assert machine_id(str(tmp_path / "absent")) == ""  # not Linux: unknown
    assert state_error(state(1, machine=label)) is None
    assert "machine longer than 64" in state_error(state(1, machine="x" * 65))


def test_a_state_with_terminal_escapes_in_its_text_is_refused():
    from mesh_node.membership.state import state_error

    assert state_error(state(1, name="café-node ☕")) is None
    for field in ("name", "software", "machine"):
        assert "holds control characters" in state_error(state(1, **{field: "n\x1b[2J"}))
    assert "holds control characters" in state_error(state(1, name="a\nb"))


def test_a_claim_with_a_host_that_could_never_resolve_is_refused():
    from dataclasses import replace

    from mesh_node.transport.addresses import host_error

    for good in ("10.0.0.1", "::1", "fe80::1%eth0", "node-1", "gpu-box.lan.", "a_b.example"):
        assert host_error(good) is None, good
        assert shape_error(replace(claim(ALIVE, 1), addresses=[Address(good, 7300)])) is None
    for bad in ("x" * 64 + ".example", "", "two words", "a..b", "-lead.example", "é.example"):
        assert host_error(bad), bad
        assert "out of range" in shape_error(replace(claim(ALIVE, 1), addresses=[Address(bad, 1)]))


def test_only_live_members_confirm_a_suspicion_and_at_most_a_few_dozen():
    from mesh_node.membership.table import MAX_ACCUSERS

    table = PeerTable(OTHERS[2].node_id, lambda: 0.0)
    table.apply(claim(ALIVE, 1))
    for other in OTHERS[:2]:  # two members the table knows
        table.apply(make_claim(other, TAG, ALIVE, other.node_id, 1, ADDR))
    table.apply(claim(SUSPECT, 1, speaker=OTHERS[0]))
    strangers = [NodeIdentity.generate() for _ in range(5)]  # keys nobody met
    for stranger in strangers:
        assert table.apply(claim(SUSPECT, 1, speaker=stranger)) is None
    assert table.apply(claim(SUSPECT, 1, speaker=OTHERS[1])) is not None
    assert table.get(SUBJECT.node_id).accusers == {OTHERS[0].node_id.key, OTHERS[1].node_id.key}
    assert MAX_ACCUSERS >= 3  # Lifeguard's confirmations fit


def test_a_suspicion_of_a_newer_incarnation_starts_its_clock_afresh():
    now = [0.0]
    table = PeerTable(OTHERS[2].node_id, lambda: now[0])
    table.apply(claim(ALIVE, 1))
    now[0] = 1.0
    table.apply(claim(SUSPECT, 1))
    assert table.get(SUBJECT.node_id).status_since == 1.0
    now[0] = 4.0
    table.apply(claim(SUSPECT, 2))  # ran ahead of the refutation alive(2)
    assert table.get(SUBJECT.node_id).status_since == 4.0


def test_state_numbers_must_be_finite_and_not_negative():
    from mesh_node.membership.messages import Load
    from mesh_node.membership.state import state_error

    assert state_error(state(1, load=Load(inflight=2, tokens_per_s=12.5))) is None
    for load in (
        Load(tokens_per_s=float("nan")),
        Load(tokens_per_s=float("inf")),
        Load(inflight=-1),
    ):
        assert "finite number >= 0" in state_error(state(1, load=load))
    assert "host name" in state_error(state(1, addresses=[Address("x" * 64 + ".example", 1)]))
    assert "out of range" in state_error(state(1, addresses=[Address("10.0.0.1", 70000)]))


def test_a_forgotten_tombstone_stays_forgotten_until_a_newer_incarnation():
    """After its TTL a tombstone is forgotten, and so are older claims about that node that
    another node, which forgot it a little later, may still hand over; a rejoin is not."""
    now = [0.0]
    table = PeerTable(OTHERS[2].node_id, lambda: now[0], tombstone_ttl=100)
    table.apply(claim(ALIVE, 3))
    table.apply(claim(DEAD, 3))
    now[0] = 101
    assert [m.node_id for m in table.reap()] == [SUBJECT.node_id]
    for old in (claim(DEAD, 3), claim(ALIVE, 3), claim(SUSPECT, 2), claim(LEFT, 3)):
        assert table.apply(old) is None and table.get(SUBJECT.node_id) is None
    back = table.apply(claim(ALIVE, 4))  # it restarted: a higher incarnation
    assert back is not None and back.status == ALIVE and back.incarnation == 4


def test_a_full_table_forgets_its_oldest_tombstone_for_a_live_node():
    now = [0.0]
    table = PeerTable(OTHERS[2].node_id, lambda: now[0], max_members=4)
    me = OTHERS[2]
    table.apply(make_claim(me, TAG, ALIVE, me.node_id, 1, ADDR))
    gone = [NodeIdentity.generate() for _ in range(3)]
    for left in gone:  # three nodes came and left (ephemeral ids, say)
        now[0] += 10
        table.apply(make_claim(left, TAG, ALIVE, left.node_id, 1, ADDR))
        table.apply(make_claim(left, TAG, LEFT, left.node_id, 1, []))
    newcomer = NodeIdentity.generate()
    member = table.apply(make_claim(newcomer, TAG, ALIVE, newcomer.node_id, 1, ADDR))
    assert member is not None and member.status == ALIVE and len(table) == 4
    assert table.get(gone[0].node_id) is None  # the oldest tombstone made room
    assert table.get(gone[1].node_id) is not None
    assert table.apply(make_claim(gone[0], TAG, LEFT, gone[0].node_id, 1, [])) is None
    # a tombstone never takes a live member's place, and live members are never evicted
    late = NodeIdentity.generate()
    table.apply(make_claim(gone[1], TAG, ALIVE, gone[1].node_id, 2, ADDR))  # rejoined
    table.apply(make_claim(gone[2], TAG, ALIVE, gone[2].node_id, 2, ADDR))
    assert table.apply(make_claim(late, TAG, LEFT, late.node_id, 1, [])) is None
    assert table.apply(make_claim(late, TAG, ALIVE, late.node_id, 1, ADDR)) is None  # full
    assert all(m.status == ALIVE for m in table) and len(table) == 4


def test_an_accusation_near_the_top_incarnation_is_malformed():
    from mesh_node.membership.claims import MAX_ACCUSED, MAX_INCARNATION

    assert shape_error(claim(SUSPECT, MAX_ACCUSED)) is None
    for kind in (SUSPECT, DEAD):
        assert "must be at most" in shape_error(claim(kind, MAX_ACCUSED + 1))
    assert shape_error(claim(ALIVE, MAX_INCARNATION)) is None  # the subject may refute there
    assert "out of range" in shape_error(claim(ALIVE, MAX_INCARNATION + 1))


def test_a_state_of_a_higher_incarnation_replaces_one_of_a_higher_version():
    """A node restarted with its clock behind its previous run's publishes lower versions;
    its state is still the newer one once it is at a higher incarnation."""
    from dataclasses import replace

    table = PeerTable(OTHERS[2].node_id, lambda: 0.0)
    table.apply(claim(ALIVE, 1))
    assert table.apply_state(replace(state(900), name="old run"))
    table.apply(claim(ALIVE, 2))  # it came back and went above its old incarnation
    # a delta of the new run (versions from a clock 10 minutes behind) needs its full state
    delta = StateDelta(node=SUBJECT.node_id.key, base=500, version=501, name="new run")
    assert table.apply_delta(delta) == "gap"
    assert not table.apply_state(replace(state(501), name="new run", incarnation=1))
    assert table.apply_state(replace(state(501), name="new run", incarnation=2))
    assert table.get(SUBJECT.node_id).state.name == "new run"
    assert table.apply_delta(replace(delta, base=501, version=502, name="on")) == "applied"
    assert not table.apply_state(replace(state(900), name="old run", incarnation=1))


def test_a_forged_copy_seen_first_does_not_get_the_genuine_claim_rejected():
    """The verifier's cache is keyed by the signature too: a copy of a claim with a forged
    signature, gossiped ahead of the real one, is refused without poisoning the real one,
    and the real one, once accepted, lends nothing to a forgery."""
    from dataclasses import replace

    verifier = Verifier()
    genuine = claim(ALIVE, 7)
    forged = replace(genuine, signature=OTHERS[1].sign(b"something else"))
    assert not verifier.verify(TAG, forged)
    assert verifier.verify(TAG, genuine)
    assert not verifier.verify(TAG, forged)
    assert not verifier.verify(TAG, replace(genuine, signature=bytes(64)))
