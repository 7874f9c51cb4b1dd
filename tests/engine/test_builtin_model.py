"""The shipped tiny MoE model answers held-out prompts of each skill through the public API."""

from __future__ import annotations

import json

import pytest

from mesh_node.engine import builtin_skills
from mesh_node.engine.catalog import BUILTIN_DIR
from mesh_node.engine.generator import GenerationRequest, Generator
from mesh_node.engine.sampling import SamplingParams
from tests.engine.conftest import DEVICES

PER_SKILL = 20


@pytest.fixture(scope="module", params=DEVICES)
def generator(request):
    """The model as a node loads it on each device: its default dtype there."""
    with Generator.from_pretrained(None, device=request.param, max_batch=16, max_queue=80) as gen:
        yield gen


def test_checkpoint_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in BUILTIN_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        files
    )
    assert sum(files.values()) <= 16 * 1024 * 1024
    config = json.loads((BUILTIN_DIR / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["num_experts"] > 1


def test_held_out_prompts_of_each_skill(generator):
    examples = builtin_skills.held_out_set(PER_SKILL, seed=2024)
    assert all(builtin_skills.is_held_out(e.prompt) for e in examples)
    params = SamplingParams(max_tokens=32)
    streams = [
        generator.submit(
            GenerationRequest(messages=[{"role": "user", "content": e.prompt}], sampling=params)
        )
        for e in examples
    ]
    correct: dict[str, int] = {}
    wrong = []
    for example, stream in zip(examples, streams, strict=True):
        result = stream.result()
        assert result.finish_reason == "stop"  # the model ends its answer with its EOS token
        if result.text.strip() == example.answer:
            correct[example.skill] = correct.get(example.skill, 0) + 1
        else:
            wrong.append((example.prompt, example.answer, result.text))
    for skill in builtin_skills.SKILLS:
        assert correct.get(skill, 0) >= 0.85 * PER_SKILL, (skill, wrong)
    assert sum(correct.values()) >= 0.95 * len(examples), wrong


def test_streamed_answer(generator):
    example = builtin_skills.held_out_set(1, seed=5)[0]
    assert example.skill == "addition"
    stream = generator.submit(
        GenerationRequest(
            messages=[{"role": "user", "content": example.prompt}],
            sampling=SamplingParams(max_tokens=16),
        )
    )
    chunks = list(stream)
    assert "".join(c.text for c in chunks) == example.answer
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in chunks)
