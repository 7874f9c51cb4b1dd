"""Answer quality of a model (whole, or restricted to some experts) on prompts with exact answers.

Two figures per prompt, both over the same chat-templated prompt:

- exact match: the greedy completion, generated through the public API (`Generator`: chat
  messages in, continuous batching, streamed text out), stripped, equals the expected answer;
- answer loss: the teacher-forced negative log-likelihood of the answer's tokens followed by the
  end-of-sequence token (what the model must produce to answer and stop). Perplexity over a set of
  prompts is `exp(sum of losses / sum of answer tokens)`.

`evaluate_quality(path, plan)` loads the model as the plan says (for independent-shard mode:
`LoadPlan(experts=..., restrict_router=True)`) and returns a `QualityReport` that keeps the
per-prompt scores, so that any selection of prompts (those a shard would serve) can be summarized
with `summarize`. The default prompts are the built-in model's held-out ones
(`builtin_skills.held_out_set`), which its training never saw. `calibration_sequences` gives
training-split prompts with answers (token ids) for measuring expert usage, disjoint from them.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mesh_node.engine import builtin_skills
from mesh_node.engine.builtin_skills import Example
from mesh_node.engine.generator import GenerationRequest, Generator
from mesh_node.engine.loading import TINY_MODEL_PARAMETERS, LoadPlan, load_model
from mesh_node.engine.model import Transformer
from mesh_node.engine.sampling import SamplingParams
from mesh_node.engine.tokenizer import Tokenizer

DEFAULT_PER_SKILL = 50  # 200 held-out prompts: ~2-3 s per evaluation of the built-in model on CPU
MAX_ANSWER_TOKENS = 32


@dataclass(frozen=True)
class PromptScore:
    correct: bool  # greedy answer == expected answer
    loss: float  # teacher-forced NLL (nats) of the answer tokens + end of sequence
    tokens: int  # how many tokens that loss is over


@dataclass(frozen=True)
class Quality:
    prompts: int
    exact_match: float  # fraction in [0, 1]
    perplexity: float  # per answer token


@dataclass(frozen=True)
class QualityReport:
    examples: tuple[Example, ...]
    scores: tuple[PromptScore, ...]  # one per example, same order
    seconds: float

    @property
    def overall(self) -> Quality:
        return summarize(self.scores)

    def per_skill(self) -> dict[str, Quality]:
        skills: dict[str, list[PromptScore]] = {}
        for example, score in zip(self.examples, self.scores, strict=True):
            skills.setdefault(example.skill, []).append(score)
        return {skill: summarize(scores) for skill, scores in skills.items()}


def summarize(scores: Iterable[PromptScore]) -> Quality:
    scores = list(scores)
    if not scores:
        raise ValueError("no prompts to summarize")
    tokens = sum(s.tokens for s in scores)
    return Quality(
        prompts=len(scores),
        exact_match=sum(s.correct for s in scores) / len(scores),
        perplexity=math.exp(sum(s.loss for s in scores) / tokens),
    )


@contextlib.contextmanager
def compute_threads(model: Transformer) -> Iterator[None]:
    """Runs the block with the intra-op thread count the Generator would use for `model`: one
    for a tiny model on CPU (its many microsecond-sized ops run several times faster on one
    thread than on two), else all."""
    before = torch.get_num_threads()
    tiny = model.args.parameter_count()["total"] < TINY_MODEL_PARAMETERS
    torch.set_num_threads(1 if tiny and model.device.type == "cpu" else before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _messages(example: Example) -> list[dict[str, str]]:
    return [{"role": "user", "content": example.prompt}]


def greedy_answers(
    generator: Generator, examples: Sequence[Example], max_tokens: int = MAX_ANSWER_TOKENS
) -> list[str]:
    """Each example's greedy completion (stripped), batched through the generator."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    answers: list[str] = []
    wave = generator.max_batch + generator.max_queue  # stay within the generator's queue bound
    for start in range(0, len(examples), wave):
        streams = [
            generator.submit(GenerationRequest(messages=_messages(e), sampling=params))
            for e in examples[start : start + wave]
        ]
        answers.extend(stream.result().text.strip() for stream in streams)
    return answers


def _end_token(model: Transformer, tokenizer: Tokenizer) -> int:
    eos = tokenizer.hf.eos_token_id
    if eos is not None:
        return int(eos)
    return min(tokenizer.eos_token_ids | frozenset(model.args.eos_token_ids))


@torch.inference_mode()
def answer_losses(
    model: Transformer, tokenizer: Tokenizer, examples: Sequence[Example]
) -> list[tuple[float, int]]:
    """(teacher-forced NLL in nats, token count) of each answer + end token after its prompt."""
    end = _end_token(model, tokenizer)
    longest = 0
    pairs = []
    for example in examples:
        prompt = tokenizer.apply_chat_template(_messages(example))
        answer = [*tokenizer.encode(example.answer, add_special_tokens=False), end]
        pairs.append((prompt, answer))
        longest = max(longest, len(prompt) + len(answer))
    cache = model.new_cache(1, longest)
    losses = []
    for prompt, answer in pairs:
        ids = torch.tensor([prompt + answer], device=model.device)
        positions = torch.arange(ids.shape[1], device=model.device)[None]
        logits = model(ids, positions, cache)[0, len(prompt) - 1 : -1]
        target = torch.tensor(answer, device=model.device)
        nll = torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        losses.append((float(nll), len(answer)))
    return losses


def evaluate_loaded(
    model: Transformer,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    *,
    max_batch: int = 16,
) -> QualityReport:
    """Scores a loaded model: greedy answers through a Generator (closed after), then losses."""
    started = time.perf_counter()
    with Generator(model, tokenizer, max_batch=max_batch, max_queue=4 * max_batch) as generator:
        answers = greedy_answers(generator, examples)
    with compute_threads(model):
        losses = answer_losses(model, tokenizer, examples)
    scores = tuple(
        PromptScore(answer == example.answer, loss, tokens)
        for example, answer, (loss, tokens) in zip(examples, answers, losses, strict=True)
    )
    return QualityReport(tuple(examples), scores, time.perf_counter() - started)


def evaluate_quality(
    path: str | Path,
    plan: LoadPlan | None = None,
    examples: Sequence[Example] | None = None,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
) -> QualityReport:
    """Loads the model folder at `path` as `plan` says and scores it on `examples` (default: the
    built-in held-out set, `DEFAULT_PER_SKILL` prompts per skill)."""
    if examples is None:
        examples = builtin_skills.held_out_set(DEFAULT_PER_SKILL)
    model = load_model(path, plan=plan, dtype=dtype, device=device, max_seq_len=None)
    tokenizer = Tokenizer(path, extra_eos_ids=model.args.eos_token_ids)
    return evaluate_loaded(model, tokenizer, examples)


def calibration_sequences(
    tokenizer: Tokenizer, count: int = 200, seed: int = 7, end_token: int | None = None
) -> list[list[int]]:
    """Token ids of `count` training-split chat turns (prompt + answer + end), all skills in turn:
    the input for `measure_expert_usage`. Never a held-out prompt."""
    rng = random.Random(seed)
    skills = list(builtin_skills.SKILLS)
    end = int(tokenizer.hf.eos_token_id) if end_token is None else end_token
    sequences = []
    for i in range(count):
        example = builtin_skills.sample(skills[i % len(skills)], rng, held_out=False)
        prompt = tokenizer.apply_chat_template(_messages(example))
        sequences.append(
            prompt + tokenizer.encode(example.answer, add_special_tokens=False) + [end]
        )
    return sequences
