"""Answer quality (greedy exact match, answer perplexity) of the built-in model, whole or shard."""

from __future__ import annotations

import math

import pytest

from mesh_node.engine import builtin_skills
from mesh_node.engine.catalog import BUILTIN_DIR
from mesh_node.engine.evaluation import (
    PromptScore,
    calibration_sequences,
    evaluate_quality,
    summarize,
)
from mesh_node.engine.loading import LoadPlan
from mesh_node.engine.tokenizer import Tokenizer

EXAMPLES = builtin_skills.held_out_set(3, seed=99)


def test_full_model_answers_and_is_confident():
    report = evaluate_quality(BUILTIN_DIR, examples=EXAMPLES)
    assert len(report.scores) == len(EXAMPLES)
    overall = report.overall
    assert overall.exact_match >= 10 / 12
    assert 1.0 <= overall.perplexity < 1.3
    assert set(report.per_skill()) == set(builtin_skills.SKILLS)
    assert all(s.tokens >= 2 for s in report.scores)  # at least one answer token and the end


def test_a_restricted_shard_is_measurably_worse():
    full = evaluate_quality(BUILTIN_DIR, examples=EXAMPLES).overall
    plan = LoadPlan(experts=[0, 1], restrict_router=True)
    shard = evaluate_quality(BUILTIN_DIR, plan, examples=EXAMPLES).overall
    assert shard.perplexity > full.perplexity


def test_summarize_pools_tokens():
    quality = summarize([PromptScore(True, 1.0, 2), PromptScore(False, 3.0, 2)])
    assert quality.exact_match == 0.5
    assert quality.perplexity == pytest.approx(math.exp(4.0 / 4))
    with pytest.raises(ValueError):
        summarize([])


def test_calibration_prompts_are_from_the_training_split():
    tokenizer = Tokenizer(BUILTIN_DIR)
    sequences = calibration_sequences(tokenizer, 40)
    assert len(sequences) == 40 and all(s[-1] == tokenizer.hf.eos_token_id for s in sequences)
    held_out = {
        tuple(tokenizer.apply_chat_template([{"role": "user", "content": e.prompt}]))
        for e in builtin_skills.held_out_set(50)
    }
    assert not any(tuple(s[: len(p)]) == p for s in sequences for p in held_out)
