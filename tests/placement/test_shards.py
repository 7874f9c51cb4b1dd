"""Independent-shard plans (core + dealt experts) and rendezvous routing of sessions to shards."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_node.placement.shards import plan_shards, shard_for_session


@st.composite
def shard_cases(draw):
    num_experts = draw(st.integers(2, 24))
    num_layers = draw(st.integers(1, 4))
    mass = draw(
        st.lists(
            st.lists(
                st.floats(0, 100, allow_nan=False), min_size=num_experts, max_size=num_experts
            ),
            min_size=num_layers,
            max_size=num_layers,
        )
    )
    return (
        mass,
        draw(st.integers(1, 6)),
        draw(st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0])),
        draw(st.sampled_from(["ranked", "random"])),
        draw(st.integers(0, 3)),
        draw(st.integers(1, 4)),
    )


@settings(max_examples=200, deadline=None)
@given(shard_cases())
def test_plan_invariants(case):
    mass, num_shards, core_fraction, assignment, seed, top_k = case
    num_experts = len(mass[0])
    try:
        plan = plan_shards(mass, num_shards, core_fraction, assignment, seed, top_k=top_k)
    except ValueError:
        core = math.ceil(core_fraction * num_experts)
        assert core + (num_experts - core) // num_shards < top_k  # refused only when too small
        return
    assert plan == plan_shards(mass, num_shards, core_fraction, assignment, seed, top_k=top_k)
    core_size = math.ceil(core_fraction * num_experts)
    shards = [plan.experts(s) for s in range(num_shards)]
    for i, layer in enumerate(plan.layers):
        ranking = sorted(range(num_experts), key=lambda e: (-mass[i][e], e))
        core = set(plan.core_experts(layer))
        assert core == set(ranking[:core_size])  # the hottest experts
        held = [set(shard[layer]) for shard in shards]
        assert all(core <= h for h in held)  # core on every shard
        assert set().union(*held) == set(range(num_experts))  # every expert somewhere
        own = [h - core for h in held]
        assert sum(len(o) for o in own) == num_experts - core_size  # ...and only once
        assert all(len(h) >= top_k for h in held)
        assert max(map(len, own)) - min(map(len, own)) <= 1  # balanced


def test_ranked_snake_order_mixes_hot_and_cold():
    mass = [[float(10 - e) for e in range(10)]]  # expert 0 hottest
    plan = plan_shards(mass, 2, core_fraction=0.2, assignment="ranked", top_k=2)
    assert plan.core == ((0, 1),)
    # rest in rank order 2..9, snake over 2 shards: 2->0 3->1 4->1 5->0 6->0 7->1 8->1 9->0
    assert plan.experts(0) == {0: (0, 1, 2, 5, 6, 9)}
    assert plan.experts(1) == {0: (0, 1, 3, 4, 7, 8)}


def test_random_assignment_depends_on_seed_and_fingerprints_differ():
    mass = {3: [float(e) for e in range(16)], 5: [float(-e) for e in range(16)]}
    plans = {s: plan_shards(mass, 3, assignment="random", seed=s) for s in range(4)}
    assert len({p.owned for p in plans.values()}) > 1
    assert len({p.fingerprint for p in plans.values()}) == 4
    assert plans[0].layers == (3, 5)
    ranked = plan_shards(mass, 3)
    assert ranked.fingerprint == plan_shards(mass, 3).fingerprint
    assert ranked.core == ((12, 13, 14, 15), (0, 1, 2, 3))


def test_too_many_shards_and_bad_arguments_are_refused():
    mass = [[1.0] * 8]
    with pytest.raises(ValueError, match="fewer shards"):
        plan_shards(mass, 8, core_fraction=0.125, top_k=2)  # 1 core + 0 own for one shard
    with pytest.raises(ValueError, match="assignment"):
        plan_shards(mass, 2, assignment="greedy")
    with pytest.raises(ValueError):
        plan_shards(mass, 0)
    with pytest.raises(ValueError):
        plan_shards([[1.0] * 8, [1.0] * 4], 2)
    with pytest.raises(IndexError):
        plan_shards(mass, 2).experts(2)


SESSIONS = [f"session-{i}" for i in range(400)]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6, unique=True), st.text())
def test_rendezvous_adding_a_shard_moves_sessions_only_to_it(shards, new):
    if new in shards:
        return
    before = {s: shard_for_session(s, shards) for s in SESSIONS}
    after = {s: shard_for_session(s, [*shards, new]) for s in SESSIONS}
    assert before == {s: shard_for_session(s, list(reversed(shards))) for s in SESSIONS}
    assert all(after[s] in (before[s], new) for s in SESSIONS)


def test_rendezvous_spreads_sessions_and_moves_about_one_in_n():
    shards = ["a", "b", "c"]
    counts = {s: 0 for s in shards}
    for session in SESSIONS:
        counts[shard_for_session(session, shards)] += 1
    assert all(90 <= c <= 180 for c in counts.values()), counts
    moved = sum(
        shard_for_session(s, shards) != shard_for_session(s, [*shards, "d"]) for s in SESSIONS
    )
    assert 60 <= moved <= 140  # about a quarter of 400
    with pytest.raises(ValueError):
        shard_for_session("x", [])
