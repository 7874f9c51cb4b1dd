"""How a step's expert calls fail: a peer's refusal that asking again cannot change fails the
step at once with the peer's own reason; a replica takes over from a refusing holder; a
passing refusal (NOT_FOUND while a plan loads) is asked again; a holder that never answers
ends in an error that says so, after `holder_wait`. Real RemoteExperts on an event loop
thread; the peers are functions answering its calls."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import torch

from mesh_node.engine.errors import GeneratorClosedError
from mesh_node.expert_parallel.dispatch import (
    DispatchConfig,
    DispatchStats,
    ExpertRoutes,
    ExpertsUnavailable,
    RemoteExperts,
)
from mesh_node.identity import NodeIdentity
from mesh_node.transport.errors import ErrorCode, RemoteError

HIDDEN = 8
DTYPE_REASON = "rows are torch.float16 but this node holds the experts in torch.bfloat16"


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


class Peers:
    """Peers answering expert calls: answers[peer] is a list of what each call gets (an
    exception to raise, "hang", or "ok": each token's partial sum is 1 per expert)."""

    def __init__(self, answers):
        self.answers = answers
        self.calls: list[tuple[object, float]] = []

    async def call(self, peer, layer, experts, counts, rows, token_of, weights):
        self.calls.append((peer, time.monotonic()))
        script = self.answers[peer]
        answer = script.pop(0) if len(script) > 1 else script[0]
        if answer == "hang":
            await asyncio.sleep(3600)
        if isinstance(answer, BaseException):
            raise answer
        return torch.full((rows.shape[0], HIDDEN), float(len(experts)))


def remote(loop, peers: Peers, holders, clock=time.monotonic, **config):
    routes = ExpertRoutes(30.0, clock)
    routes.update({(0, e): tuple(holders) for e in range(4)})
    stats = DispatchStats()
    experts = RemoteExperts(
        0, lambda: None, routes, peers.call, loop, stats, DispatchConfig(**config)
    )
    return experts, stats


def step(experts):
    x, chosen, weights = torch.randn(1, HIDDEN), torch.tensor([[0, 1]]), torch.ones(1, 2)
    return experts.run_combined(x, chosen, weights)


def test_a_final_refusal_fails_the_step_at_once_with_the_peers_reason(loop):
    peer = NodeIdentity.generate().node_id
    peers = Peers({peer: [RemoteError(ErrorCode.BAD_REQUEST, DTYPE_REASON)]})
    experts, stats = remote(loop, peers, [peer], call_timeout=1.0, holder_wait=30.0)
    started = time.monotonic()
    with pytest.raises(ExpertsUnavailable) as failed:
        step(experts)
    assert time.monotonic() - started < 10  # not after holder_wait (30 s)
    assert "refuse the call" in str(failed.value)
    assert DTYPE_REASON in str(failed.value) and peer.short in str(failed.value)
    assert len(peers.calls) == 1 and stats.failovers == 1  # asked once, not every 0.5 s


def test_a_replica_answers_for_a_holder_that_refuses(loop):
    refusing, good = NodeIdentity.generate().node_id, NodeIdentity.generate().node_id
    peers = Peers(
        {refusing: [RemoteError(ErrorCode.NOT_SUPPORTED, "no expert service here")], good: ["ok"]}
    )
    now = [0.0]
    experts, stats = remote(
        loop, peers, [refusing, good], lambda: now[0], call_timeout=1.0, holder_wait=30.0
    )
    for _ in range(2):
        assert torch.equal(step(experts), torch.full((1, HIDDEN), 2.0))
    assert stats.failovers == 1
    # the next step (and layer) asks the replica first: the refusal is remembered...
    assert [p for p, _ in peers.calls] == [refusing, good, good]
    now[0] = 30.1  # ...for failure_memory: then the peer is asked first again (mended?)
    assert torch.equal(step(experts), torch.full((1, HIDDEN), 2.0))
    assert [p for p, _ in peers.calls][3:] == [refusing, good] and stats.failovers == 2


def test_a_passing_refusal_is_asked_again(loop):
    peer = NodeIdentity.generate().node_id
    loading = RemoteError(ErrorCode.NOT_FOUND, "experts [0, 1] of layer 0 are not held here")
    peers = Peers({peer: [loading, loading, "ok"]})
    experts, stats = remote(loop, peers, [peer], call_timeout=1.0, holder_wait=30.0)
    assert torch.equal(step(experts), torch.full((1, HIDDEN), 2.0))
    assert len(peers.calls) == 3 and stats.failovers == 2


def test_a_holder_that_never_answers_is_named_in_the_error(loop, caplog):
    peer = NodeIdentity.generate().node_id
    peers = Peers({peer: ["hang"]})
    experts, _ = remote(loop, peers, [peer], call_timeout=0.2, holder_wait=0.5)
    caplog.set_level(logging.WARNING, "mesh_node.experts")
    with pytest.raises(ExpertsUnavailable) as failed:
        step(experts)
    assert "no live holder" in str(failed.value)
    assert f"last answers: {peer.short}: TimeoutError" in str(failed.value)
    assert "failed (TimeoutError): trying another holder" in caplog.text  # not "failed ()"


def test_a_call_made_in_pieces_is_waited_for_piece_by_piece(loop, monkeypatch):
    """A huge prefill's call to a peer goes as several ExpertCalls, one after another, each
    with call_timeout: the step waits for all of them, not for one call's time."""
    from mesh_node.expert_parallel import dispatch

    peer = NodeIdentity.generate().node_id
    monkeypatch.setattr(dispatch, "MAX_CALL_BYTES", 2 * HIDDEN * 4)  # 2 float32 rows a piece

    class Slow(Peers):
        seconds = 0.0

        async def call(self, peer, layer, experts, counts, rows, token_of, weights):
            await asyncio.sleep(self.seconds)
            return await super().call(peer, layer, experts, counts, rows, token_of, weights)

    peers = Slow({peer: ["ok"]})
    experts, stats = remote(loop, peers, [peer], call_timeout=0.3, call_slack=0.1, holder_wait=0.0)
    # 4 tokens x 2 experts = 8 rows: 4 pieces, 0.8 s in all, within 4 x 0.3 s + 0.1 s
    peers.seconds = 0.8
    x, chosen, weights = torch.randn(4, HIDDEN), torch.tensor([[0, 1]] * 4), torch.ones(4, 2)
    assert torch.equal(experts.run_combined(x, chosen, weights), torch.full((4, HIDDEN), 2.0))
    assert stats.failovers == 0
    # 1 token x 2 experts = 2 rows: one piece, which gets 0.3 s + 0.1 s
    with pytest.raises(ExpertsUnavailable, match="TimeoutError"):
        step(experts)
    assert stats.failovers == 1


def test_a_step_waiting_for_holders_ends_at_once_when_its_node_stops(loop):
    """A stopping host's peers replan without it and answer NOT_FOUND: its steps retried
    until holder_wait (60 s), holding up the stop (soak review: 18 s after SIGTERM). Closed
    routes end the step with the reason."""
    peer = NodeIdentity.generate().node_id
    gone = RemoteError(ErrorCode.NOT_FOUND, "experts [0, 1] of layer 0 are not held here")
    peers = Peers({peer: [gone]})
    experts, _ = remote(loop, peers, [peer], call_timeout=1.0, holder_wait=30.0)
    routes = experts._routes
    closer = threading.Timer(0.3, routes.close, ("this node is stopping",))
    closer.start()
    started = time.monotonic()
    # (not ExpertsUnavailable, which a client is told: an answer under way here fails over)
    with pytest.raises(GeneratorClosedError, match="not computed: this node is stopping"):
        step(experts)
    assert time.monotonic() - started < 10  # not after holder_wait (30 s)
    calls = len(peers.calls)
    with pytest.raises(GeneratorClosedError, match="this node is stopping"):
        step(experts)  # and no call is made any more
    assert len(peers.calls) == calls
