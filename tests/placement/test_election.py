"""Host election: a pure, deterministic function of gossiped state."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_node.identity import NodeIdentity
from mesh_node.placement.election import GIB, NodeView, elect, fits

IDS = sorted(NodeIdentity.generate().node_id for _ in range(8))
MODEL = "m"
SIZE = 10 * GIB


def view(i, *, live=True, role="worker", total=64, free=32, disk=True, served=False, inflight=0):
    return NodeView(
        IDS[i],
        live,
        role,
        total * GIB,
        free * GIB,
        {MODEL: SIZE} if disk else {},
        frozenset({MODEL}) if served else frozenset(),
        inflight,
    )


def test_one_host_by_total_memory_then_id():
    nodes = [view(0, total=32), view(1, total=64), view(2, total=64)]
    assert elect(MODEL, nodes).hosts == (IDS[1],)


def test_eligibility_rules():
    nodes = [
        view(0, live=False, total=512),
        view(1, role="client", total=512),
        view(2, disk=False, total=512),
        view(3, free=10.5, total=512),  # 10.5 GiB free < 1.1 * 10 GiB
        view(4, free=11, total=16),
    ]
    result = elect(MODEL, nodes)
    assert result.eligible == (IDS[4],) and result.hosts == (IDS[4],)
    assert elect(MODEL, nodes[:4]).hosts == ()


def test_a_current_host_counts_its_own_copy_as_free_and_keeps_the_model():
    host = view(0, total=16, free=2, served=True)  # the model already takes its memory
    bigger = view(1, total=512, free=400)
    assert fits(host, MODEL, 1.1)
    assert elect(MODEL, [host, bigger]).hosts == (IDS[0],)  # no move, no restart


def test_replicas_follow_demand():
    busy = [view(0, served=True, inflight=6), view(1), view(2)]
    assert len(elect(MODEL, busy).hosts) == 2
    two_busy = [view(0, served=True, inflight=5), view(1, served=True, inflight=4), view(2)]
    assert len(elect(MODEL, two_busy).hosts) == 3
    idle = [view(0, served=True), view(1, served=True), view(2)]
    assert elect(MODEL, idle).hosts == (IDS[0],)  # shrink by one, keeping the first
    steady = [view(0, served=True, inflight=2), view(1, served=True, inflight=2)]
    assert len(elect(MODEL, steady).hosts) == 2


def test_re_election_when_a_host_dies():
    nodes = [view(0, served=True, total=512), view(1, total=64), view(2, total=32)]
    assert elect(MODEL, nodes).hosts == (IDS[0],)
    nodes[0] = view(0, live=False, served=True, total=512)
    assert elect(MODEL, nodes).hosts == (IDS[1],)


NODES = st.lists(
    st.builds(
        view,
        st.integers(0, 7),
        live=st.booleans(),
        role=st.sampled_from(["worker", "host", "client"]),
        total=st.integers(1, 256),
        free=st.integers(0, 256),
        disk=st.booleans(),
        served=st.booleans(),
        inflight=st.integers(0, 10),
    ),
    max_size=8,
    unique_by=lambda v: v.node_id,
)


@settings(max_examples=300, deadline=None)
@given(NODES, st.randoms())
def test_election_properties(nodes, rnd):
    result = elect(MODEL, nodes)
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    assert elect(MODEL, shuffled) == result  # order of the view does not matter
    by_id = {n.node_id: n for n in nodes}
    assert set(result.hosts) <= set(result.eligible)
    assert len(set(result.hosts)) == len(result.hosts)
    for node_id in result.hosts:
        node = by_id[node_id]
        assert node.live and node.role != "client" and fits(node, MODEL, 1.1)
    assert bool(result.hosts) == bool(result.eligible)  # someone hosts whenever anyone can
    # current hosts stay (at most one goes when demand falls), in a stable order
    current = sorted(
        n.node_id for n in nodes if n.node_id in result.eligible and MODEL in n.models_served
    )
    kept = [h for h in result.hosts if h in current]
    assert kept == current[: len(kept)] and len(kept) >= len(current) - 1
    assert result.fingerprint == elect(MODEL, shuffled).fingerprint


def test_fingerprints_differ_with_hosts():
    a = elect(MODEL, [view(0), view(1, total=8)])
    b = elect(MODEL, [view(0, total=8), view(1)])
    assert a.hosts != b.hosts and a.fingerprint != b.fingerprint


def test_room_is_decided_in_integers_at_the_edge():
    """1.1 x size in floats is often one ulp above the exact value: at exactly 1.1 x the
    size free (10 x free == 11 x size) a node is eligible, one byte less it is not."""
    size = 10 * GIB + 10
    exact = 11 * size // 10
    assert 10 * exact == 11 * size and exact < 1.1 * size  # the float product overshoots
    for free, eligible in ((exact, True), (exact - 1, False)):
        node = NodeView(IDS[0], True, "worker", 64 * GIB, free, {MODEL: size}, frozenset())
        assert fits(node, MODEL, 1.1) is eligible
        assert elect(MODEL, [node]).hosts == ((IDS[0],) if eligible else ())
