"""Our logits and greedy generations against transformers', for every supported architecture, on
every device torch sees (the reference always runs on the CPU in float32)."""

from __future__ import annotations

import pytest
import torch

from mesh_node.engine.generator import GenerationRequest, Generator
from mesh_node.engine.loading import load_model
from mesh_node.engine.sampling import SamplingParams
from mesh_node.engine.tokenizer import Tokenizer
from tests.engine.conftest import DEVICES, MOE_VARIANTS
from tests.engine.reference_checkpoints import VARIANTS, VOCAB_SIZE

TOLERANCE = 1e-4
CASES = [(name, False) for name in VARIANTS] + [(name, True) for name in MOE_VARIANTS]
IDS = [f"{name}-{'fused' if fused else 'per-expert'}" for name, fused in CASES]


def prompts(count: int = 4, seed: int = 7) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [3, 9, 17, 28, 5, 12][:count]
    return [torch.randint(0, VOCAB_SIZE - 4, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "fused"), CASES, ids=IDS)
def test_prefill_and_decode_logits_match_transformers(references, name, fused, device):
    folder, reference = references.get(name, fused)
    model = load_model(folder, dtype=torch.float32, device=device, max_seq_len=64)
    cache = model.new_cache(slots=2)
    for prompt in prompts():
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = reference(input_ids=ids).logits[0]
        # prefill: the whole prompt at once, in slot 1
        positions = torch.arange(len(prompt), device=device)[None]
        got = model(ids.to(device), positions, cache, slot_start=1)[0].cpu()
        assert torch.allclose(got, expected, atol=TOLERANCE, rtol=0), (got - expected).abs().max()
        # decode: one token at a time through the KV cache, in slot 0
        for position, token in enumerate(prompt):
            step = model(
                torch.tensor([[token]], device=device),
                torch.tensor([[position]], device=device),
                cache,
                slot_start=0,
            )
            assert torch.allclose(step[0, 0].cpu(), expected[position], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "fused"), CASES, ids=IDS)
def test_greedy_generation_matches_transformers_alone_and_batched(references, name, fused, device):
    folder, reference = references.get(name, fused)
    reference.generation_config.eos_token_id = None  # 32 tokens whatever comes
    cases = prompts(6)
    expected = []
    for prompt in cases:
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
        expected.append(out[0, len(prompt) :].tolist())

    model = load_model(folder, dtype=torch.float32, device=device, max_seq_len=96)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    with Generator(model, Tokenizer(folder), max_batch=4, prefill_chunk=8) as generator:
        alone = [
            generator.generate(GenerationRequest(prompt_ids=p, sampling=params)).token_ids
            for p in cases
        ]
        # six concurrent requests over four slots: sequences join and leave a running batch
        streams = [
            generator.submit(GenerationRequest(prompt_ids=p, sampling=params)) for p in cases
        ]
        batched = [stream.result().token_ids for stream in streams]
    assert [list(x) for x in alone] == expected
    assert [list(x) for x in batched] == expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["qwen3_moe", "llama"])
def test_bfloat16_stays_close_to_float32(references, name, device):
    """bf16 weights (the default for larger models; float32 KV cache on CPU): logits close to the
    float32 ones, and batched generation runs through the same paths."""
    folder, _ = references.get(name)
    full = load_model(folder, dtype=torch.float32, device="cpu", max_seq_len=64)
    half = load_model(folder, dtype=torch.bfloat16, device=device, max_seq_len=64)
    prompt = torch.tensor([prompts(1)[0]])
    positions = torch.arange(prompt.shape[1])[None]
    expected = full(prompt, positions, full.new_cache(1))
    got = half(prompt.to(device), positions.to(device), half.new_cache(1)).cpu()
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    with Generator(half, Tokenizer(folder), max_batch=3) as generator:
        streams = [
            generator.submit(GenerationRequest(prompt_ids=p, sampling=params)) for p in prompts(5)
        ]
        assert [len(s.result().token_ids) for s in streams] == [12] * 5
