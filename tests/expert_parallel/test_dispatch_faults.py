"""How a step's expert calls treat a peer that is alive but does not answer, and a peer that
answers numbers no expert computes. Real
RemoteExperts on an event-loop thread; the peers are functions answering its calls (as in
tests/expert_parallel/test_dispatch_failures.py)."""

from __future__ import annotations

import time

import torch

from mesh_node.expert_parallel.dispatch import (
    DispatchConfig,
    DispatchStats,
    ExpertRoutes,
    ExpertsUnavailable,
    RemoteExperts,
)
from mesh_node.identity import NodeIdentity
from tests.expert_parallel.test_dispatch_failures import HIDDEN, Peers, loop  # noqa: F401

LAYERS = 4  # MoE layers of one forward pass (the built-in model's count)


def layers_held_by(loop, peers: Peers, holders, **config):  # noqa: F811
    """One RemoteExperts per MoE layer of a model, every expert of every layer held by
    `holders` (best first), as a host's engine has them."""
    routes = ExpertRoutes()
    routes.update({(layer, e): tuple(holders) for layer in range(LAYERS) for e in range(4)})
    stats = DispatchStats()
    config = DispatchConfig(**config)
    return [
        RemoteExperts(layer, lambda: None, routes, peers.call, loop, stats, config)
        for layer in range(LAYERS)
    ], stats


def forward(layers) -> list[torch.Tensor]:
    """One decode step's MoE layers, one after another (what the engine's forward does)."""
    x, chosen, weights = torch.randn(1, HIDDEN), torch.tensor([[0, 1]]), torch.ones(1, 2)
    return [layer.run_combined(x, chosen, weights) for layer in layers]


def test_a_replica_holder_that_timed_out_is_not_waited_for_again_in_every_layer(loop):  # noqa: F811
    """A peer that is alive (it answers SWIM probes: only its expert computation is stuck)
    holds a replica of every expert and is preferred by the routes. The first layer's call
    to it times out and the replica answers; the other layers of the step (and later steps,
    for FAILURE_MEMORY s) ask the replica first, instead of waiting call_timeout in every
    layer (120 s a token at the defaults for 4 MoE layers, 24 minutes for 48)."""
    hung, healthy = NodeIdentity.generate().node_id, NodeIdentity.generate().node_id
    peers = Peers({hung: ["hang"], healthy: ["ok"]})
    layers, stats = layers_held_by(
        loop, peers, [hung, healthy], call_timeout=0.3, call_slack=0.1, holder_wait=5.0
    )
    started = time.monotonic()
    outputs = forward(layers)
    elapsed = time.monotonic() - started
    assert all(torch.equal(out, torch.full((1, HIDDEN), 2.0)) for out in outputs)  # replica's
    asked_hung = [p for p, _ in peers.calls].count(hung)
    assert asked_hung == 1, (
        f"the unresponsive peer was asked in {asked_hung} of {LAYERS} layers of one step, "
        f"each waiting call_timeout ({elapsed:.1f}s for the step; {stats.failovers} failovers)"
    )


class AnswersNaN(Peers):
    """Peers as in Peers; "nan" answers sums of the right shape and dtype, all NaN."""

    async def call(self, peer, layer, experts, counts, rows, token_of, weights):
        if self.answers[peer][0] == "nan":
            self.calls.append((peer, time.monotonic()))
            return torch.full((rows.shape[0], HIDDEN), float("nan"))
        return await super().call(peer, layer, experts, counts, rows, token_of, weights)


def test_a_peer_answering_non_finite_sums_is_not_mixed_into_the_output(loop):  # noqa: F811
    """A faulty member (a broken device or kernel) answers F32 [T, hidden] sums full of NaN:
    shape and dtype are right, the numbers are not. That answer counts as a failed call: the
    replica answers (or, with none, the step fails with a clear error), never NaN logits."""
    broken, healthy = NodeIdentity.generate().node_id, NodeIdentity.generate().node_id
    peers = AnswersNaN({broken: ["nan"], healthy: ["ok"]})
    layers, _ = layers_held_by(loop, peers, [broken, healthy], call_timeout=1.0, holder_wait=1.0)
    x, chosen, weights = torch.randn(1, HIDDEN), torch.tensor([[0, 1]]), torch.ones(1, 2)
    try:
        out = layers[0].run_combined(x, chosen, weights)
    except ExpertsUnavailable:
        return  # refused, with an error: acceptable
    assert torch.isfinite(out).all(), "NaN partial sums of a peer went into the layer's output"
