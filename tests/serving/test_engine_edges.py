"""Where the serving layer meets the engine: a request too large for any host, an engine that
fails mid-request, a temperature too small to divide by, a replay at the edge of the context."""

from __future__ import annotations

import contextlib

import pytest

from mesh_node.engine import GenerationRequest, Generator
from mesh_node.engine.sampling import SamplingParams
from mesh_node.serving.local import LocalModels
from mesh_node.serving.requests import (
    BadRequest,
    ChatMessage,
    CompletionRequest,
    GenerationFailed,
)
from mesh_node.serving.tunnel import stream_from_host
from mesh_node.transport.errors import ErrorCode, ProtocolError, RemoteError

HI = (ChatMessage("user", "What is 348 + 276?"),)


class _RefusingHost:
    """A connection that refuses the request's frame: over the host's limit (the host resets
    the stream), or over ours (refused before it is sent)."""

    def __init__(self, error: Exception):
        self.error = error

    @contextlib.asynccontextmanager
    async def stream(self, message, timeout, window):
        raise self.error
        yield


@pytest.mark.parametrize(
    "error",
    [
        RemoteError(ErrorCode.FRAME_TOO_LARGE, "frame body of 1500000 bytes exceeds 1048576"),
        ProtocolError(ErrorCode.FRAME_TOO_LARGE, "GenerateRequest of 1500000 bytes: not sent"),
    ],
    ids=["host's limit", "ours"],
)
async def test_a_request_too_large_for_the_host_is_the_requests_fault_not_the_hosts(error):
    request = CompletionRequest(model="builtin", request_id="r", messages=HI)
    with pytest.raises(BadRequest, match="too large to pass to the host"):
        async for _ in stream_from_host(_RefusingHost(error), request, item_timeout=5):
            pass


@pytest.fixture(scope="module")
def generator():
    with Generator.from_pretrained(max_seq_len=64) as built:
        yield built


async def test_an_engine_failure_is_a_failed_generation(generator, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(generator.model, "forward", out_of_memory)
    local = LocalModels()
    local.generators["builtin"] = generator
    request = CompletionRequest(model="builtin", request_id="r", messages=HI)
    with pytest.raises(GenerationFailed, match="generation failed"):
        async with local.stream(request) as deltas:
            async for _ in deltas:
                pass


def test_a_temperature_too_small_to_divide_by_decodes_greedily(generator):
    greedy = generator.generate(
        GenerationRequest(messages=[{"role": "user", "content": "What is 348 + 276?"}])
    )
    for tiny in (1e-300, 1e-45, 1e-6):
        params = SamplingParams(temperature=tiny, seed=1)
        assert params.greedy
        answer = generator.generate(
            GenerationRequest(
                messages=[{"role": "user", "content": "What is 348 + 276?"}], sampling=params
            )
        )
        assert answer.token_ids == greedy.token_ids and answer.text == "624"
    assert not SamplingParams(temperature=0.01).greedy


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": float("nan")},
        {"max_tokens": float("nan")},
        {"max_tokens": 2.5},
        {"max_tokens": True},
        {"top_k": 1.5},
        {"top_p": float("nan")},
    ],
)
def test_sampling_values_that_are_no_numbers_are_refused(bad):
    with pytest.raises(ValueError, match="must be"):
        SamplingParams(**bad)


def test_a_replay_that_fills_the_context_finishes_with_its_last_token(generator):
    messages = [{"role": "user", "content": "Reverse the words: blue green red"}]
    sampling = SamplingParams(max_tokens=1000, ignore_eos=True)
    whole = generator.generate(GenerationRequest(messages=messages, sampling=sampling))
    assert whole.finish_reason == "length"
    prompt = whole.usage.prompt_tokens
    cut = 64 - prompt  # prompt + generated == max_seq_len: the cache holds them all
    replay = generator.generate(
        GenerationRequest(messages=messages, generated_ids=whole.token_ids[:cut], sampling=sampling)
    )
    assert replay.token_ids == whole.token_ids[cut:] and replay.finish_reason == "length"
    with pytest.raises(Exception, match=r"maximum context length is 64 tokens.*\(\+ \d+ already"):
        generator.generate(
            GenerationRequest(
                messages=messages, generated_ids=whole.token_ids[: cut + 1], sampling=sampling
            )
        )
