"""How a shard node waits for the leader's rankings before loading its shard
(`IndependentShards.load`): the waits and errors, against a scripted view of the mesh and a
clock the test moves. (Loading a shard and serving it across real nodes:
tests/gateway/test_independent_shards_in_process.py.)"""

from __future__ import annotations

import asyncio

import pytest

from mesh_node.engine.catalog import BUILTIN_DIR, ResolvedModel
from mesh_node.expert_parallel import independent_shards
from mesh_node.expert_parallel.independent_shards import LOAD_WAIT, IndependentShards
from mesh_node.identity import NodeIdentity
from mesh_node.membership.messages import ModelInfo

MODEL = "builtin"
BUILTIN = ResolvedModel(MODEL, BUILTIN_DIR, "builtin")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class ScriptedMesh:
    """The part of ExpertParallel a shard node's loading reads: who offers the model as a shard
    (and the rankings digest each publishes) and which rankings have been fetched. Each
    `wait_change` is one step of the script: the test's `step` callback moves the clock or
    changes the mesh."""

    def __init__(self, node_id, clock: Clock) -> None:
        self.node_id = node_id
        self.clock = clock
        self.offers: dict = {}  # node -> published rankings digest
        self.fetched: dict = {}  # digest -> rankings
        self.asked: list = []  # (digest, source) of each rankings_for
        self.steps = 0
        self.step = lambda count: None

    def offers_of(self, model: str):
        return [
            (node, ModelInfo(model, "test", 1, 1, experts=8, rankings=digest, shard=True))
            for node, digest in self.offers.items()
        ]

    def participates(self, node) -> bool:
        return True

    def rankings_for(self, model: str, digest: str, source):
        self.asked.append((digest, source))
        return self.fetched.get(digest)

    def fetch_error(self, digest: str) -> str | None:
        return None

    async def choose_rankings(self, model: str, analysis: str = "micro") -> str:
        raise AssertionError("this node does not lead in these tests")

    async def wait_change(self, timeout: float) -> None:
        self.steps += 1
        assert self.steps < 1000, "the loading loop did not end"
        self.step(self.steps)
        await asyncio.sleep(0)


def nodes_in_order(count: int):
    return sorted(NodeIdentity.generate().node_id for _ in range(count))


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(independent_shards.time, "monotonic", clock.monotonic)
    return clock


async def test_a_node_that_is_no_longer_a_shard_node_stops_loading_with_an_error(clock):
    leader, me = nodes_in_order(2)
    mesh = ScriptedMesh(me, clock)
    mesh.offers = {leader: "", me: ""}  # the leader is still analysing

    def step(count: int) -> None:
        clock.now += 1.0
        if count == 3:  # this node's offer is gone from the view (e.g. it stopped offering)
            del mesh.offers[me]

    mesh.step = step
    with pytest.raises(RuntimeError, match="not a shard node of builtin"):
        await IndependentShards(mesh, enabled=True).load(BUILTIN, config=None)
    assert mesh.steps == 3


async def test_an_unfetchable_digest_times_out_after_load_wait_from_when_it_was_published(clock):
    leader, me = nodes_in_order(2)
    mesh = ScriptedMesh(me, clock)
    mesh.offers = {leader: "", me: ""}
    published_at = []

    def step(count: int) -> None:
        if count == 5:  # the leader has analysed (for a long time): its digest is out
            mesh.offers[leader] = "digest-a"
            published_at.append(clock.now)
        clock.now += LOAD_WAIT / 4  # long before, so the analysis' wait does not count

    mesh.step = step
    with pytest.raises(TimeoutError, match=f"from the shards' leader {leader.short}"):
        await IndependentShards(mesh, enabled=True).load(BUILTIN, config=None)
    waited = clock.now - published_at[0]
    assert LOAD_WAIT < waited <= LOAD_WAIT + LOAD_WAIT / 2
    assert set(mesh.asked) == {("digest-a", leader)}


async def test_a_new_leader_with_the_same_digest_gets_a_fetch_timer_of_its_own(clock):
    """The leader publishes a digest this node cannot fetch, then leaves just before LOAD_WAIT
    has passed; the next leader publishes the same digest (the rankings it fetched from the
    first). The wait for it starts afresh: no TimeoutError at once, and one after LOAD_WAIT
    if the new leader cannot be reached either."""
    first, second, me = nodes_in_order(3)
    mesh = ScriptedMesh(me, clock)
    mesh.offers = {first: "digest-a", second: "digest-a", me: "digest-a"}
    changed_at = []

    def step(count: int) -> None:
        clock.now += LOAD_WAIT / 8
        if count == 7:  # 7/8 of LOAD_WAIT after the first attempt: the first leader leaves
            del mesh.offers[first]
            changed_at.append(clock.now)

    mesh.step = step
    with pytest.raises(TimeoutError, match=f"from the shards' leader {second.short}"):
        await IndependentShards(mesh, enabled=True).load(BUILTIN, config=None)
    assert clock.now - changed_at[0] > LOAD_WAIT
    assert ("digest-a", first) in mesh.asked and mesh.asked[-1] == ("digest-a", second)


async def test_the_wait_for_an_analysing_leader_has_no_limit(clock, caplog, monkeypatch):
    """However long the leader's analysis takes, a shard node waits (warning every
    LOAD_WAIT); once the rankings are published and fetched the wait ends (here the test
    stops it there, before a shard is loaded)."""
    leader, me = nodes_in_order(2)
    mesh = ScriptedMesh(me, clock)
    mesh.offers = {leader: "", me: ""}

    class Fetched(Exception):
        pass

    def step(count: int) -> None:
        clock.now += LOAD_WAIT / 2
        if count == 20:  # ten times LOAD_WAIT later
            mesh.offers[leader] = "digest-a"
        if count == 21:
            mesh.fetched["digest-a"] = Fetched

    def stop_before_loading(path):
        raise Fetched

    mesh.step = step
    caplog.set_level("WARNING", logger="mesh_node.shards")
    monkeypatch.setattr(independent_shards.Checkpoint, "open", stop_before_loading)
    with pytest.raises(Fetched):
        await IndependentShards(mesh, enabled=True).load(BUILTIN, config=None)
    assert mesh.steps == 21
    warnings = [r for r in caplog.records if "still waiting" in r.getMessage()]
    assert 5 <= len(warnings) <= 10  # at most one per LOAD_WAIT (the clock's steps are coarse)
