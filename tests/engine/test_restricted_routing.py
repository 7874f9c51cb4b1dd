"""Restricted routing (independent-shard mode): a router limited to the experts a node holds."""

from __future__ import annotations

import pytest
import torch

from mesh_node.engine.experts import ExpertNotLoadedError
from mesh_node.engine.generator import GenerationRequest, Generator
from mesh_node.engine.loading import LoadPlan, load_model
from mesh_node.engine.sampling import SamplingParams
from tests.engine.conftest import MOE_VARIANTS

TOKENS = [[5, 17, 99, 3, 42, 8, 200, 7, 61, 13, 88, 2]]


def run(model, tokens=TOKENS) -> torch.Tensor:
    ids = torch.tensor(tokens)
    positions = torch.arange(ids.shape[1])[None]
    return model(ids, positions, model.new_cache(1, ids.shape[1]))


def subset_for(model) -> dict[int, list[int]]:
    """A different subset of top_k + 1 experts per MoE layer."""
    layers = list(model.moe_layers())
    n, k = layers[0].num_experts, layers[0].top_k
    return {m.layer: [(m.layer + 2 * j) % n for j in range(k + 1)] for m in layers}


@pytest.mark.parametrize("name", MOE_VARIANTS)
def test_all_experts_allowed_equals_the_normal_model_exactly(references, name):
    folder, _ = references.get(name)
    full = load_model(folder, dtype=torch.float32, device="cpu")
    restricted = load_model(
        folder, plan=LoadPlan(restrict_router=True), dtype=torch.float32, device="cpu"
    )
    expected = run(full)
    assert all(m.router_mask is None for m in restricted.moe_layers())  # no extra ops
    assert torch.equal(run(restricted), expected)
    # the masked path itself, with nothing masked, computes the same logits
    for layer in restricted.moe_layers():
        layer.router_mask = torch.zeros(layer.num_experts)
    assert torch.equal(run(restricted), expected)


@pytest.mark.parametrize("name", MOE_VARIANTS)
def test_a_subset_routes_only_to_held_experts(references, name):
    folder, _ = references.get(name)
    probe = load_model(folder, plan=LoadPlan.trunk(), dtype=torch.float32, device="cpu")
    subset = subset_for(probe)
    plan = LoadPlan(experts=subset, restrict_router=True)
    model = load_model(folder, plan=plan, dtype=torch.float32, device="cpu")
    seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def observe(layer, probs, chosen, weights):
        seen[layer] = (probs.clone(), chosen.clone(), weights.clone())

    for layer in model.moe_layers():
        assert layer.allowed_experts == tuple(sorted(subset[layer.layer]))
        layer.observer = observe
    logits = run(model)
    assert torch.isfinite(logits).all()
    for layer, (probs, chosen, weights) in seen.items():
        allowed = torch.tensor(sorted(subset[layer]))
        assert set(chosen.flatten().tolist()) <= set(subset[layer])
        # the softmax is over the allowed experts only
        outside = torch.ones(probs.shape[-1], dtype=torch.bool)
        outside[allowed] = False
        assert (probs[:, outside] == 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[0]))
        gathered = probs.gather(-1, chosen)
        if model.args.moe.normalize_top_k:
            gathered = gathered / gathered.sum(-1, keepdim=True)
        torch.testing.assert_close(weights, gathered)

    # the same experts without the restriction: tokens get routed to experts not held here
    unrestricted = load_model(folder, plan=LoadPlan(experts=subset), device="cpu")
    with pytest.raises(ExpertNotLoadedError):
        run(unrestricted)


def test_fewer_experts_than_top_k_is_refused_at_load(references):
    folder, _ = references.get("qwen3_moe")
    with pytest.raises(ValueError, match="at least 2 experts"):
        load_model(
            folder, plan=LoadPlan(experts={0: [1, 2], 1: [3], 2: [0, 4]}, restrict_router=True)
        )
    # without the restriction a partial bank is fine (expert parallelism fills the gaps)
    load_model(folder, plan=LoadPlan(experts={0: [1, 2], 1: [3], 2: [0, 4]}), device="cpu")


def test_restricted_builtin_generator_answers_without_missing_experts():
    plan = LoadPlan(experts={layer: [0, 2, 5, 7] for layer in range(4)}, restrict_router=True)
    with Generator.from_pretrained(None, device="cpu", plan=plan, max_batch=4) as generator:
        layers = list(generator.model.moe_layers())
        assert all(m.allowed_experts == (0, 2, 5, 7) for m in layers)
        params = SamplingParams(max_tokens=12, temperature=0.0)
        prompts = ["What is 12 + 30?", "Sort the letters: d a c", "Reverse the words: sun moon"]
        streams = [
            generator.submit(
                GenerationRequest(messages=[{"role": "user", "content": p}], sampling=params)
            )
            for p in prompts
        ]
        for stream in streams:
            result = stream.result(timeout=30)
            assert result.finish_reason in ("stop", "length")
            assert result.token_ids
