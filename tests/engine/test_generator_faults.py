"""Faults inside the Generator: a slow tokenization, a failing sampling step, a dead worker.
Each costs at most the requests it touched, and a dead worker says so (`failure`)."""

from __future__ import annotations

import threading

import pytest
import torch

import mesh_node.engine.generator as generator_module
from mesh_node.engine.errors import EngineError, GeneratorClosedError
from mesh_node.engine.generator import GenerationRequest, Generator
from mesh_node.engine.loading import load_model
from mesh_node.engine.sampling import SamplingParams
from mesh_node.engine.tokenizer import Tokenizer

PROMPT = [72, 101, 108, 108, 111, 32, 119, 111]
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.9, top_p=0.9, seed=7)
WAIT = 60  # seconds: only a broken generator ever waits this long


class GatedTokenizer(Tokenizer):
    """Encoding the text "slow" waits until the test opens the gate (a huge prompt)."""

    def __init__(self, folder):
        super().__init__(folder)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def encode(self, text, add_special_tokens=True):
        if text == "slow":
            self.entered.set()
            assert self.gate.wait(WAIT), "the test never opened the gate"
        return super().encode(text, add_special_tokens)


@pytest.fixture
def llama(references):
    folder, _ = references.get("llama")
    return folder, load_model(folder, dtype=torch.float32, device="cpu", max_seq_len=128)


def submit(generator, sampling=GREEDY, **kwargs):
    kwargs.setdefault("prompt_ids", PROMPT)
    return generator.submit(GenerationRequest(sampling=sampling, **kwargs))


def test_running_requests_go_on_while_a_long_prompt_is_tokenized(llama):
    folder, model = llama
    tokenizer = GatedTokenizer(folder)
    with Generator(model, tokenizer, max_batch=4) as generator:
        expected = submit(generator).result(WAIT).token_ids
        running = submit(generator)
        slow = submit(generator, prompt="slow", prompt_ids=None)
        cancelled = submit(generator, prompt="slow", prompt_ids=None)  # waits its turn
        assert tokenizer.entered.wait(WAIT)
        # the running request finishes while "slow" is still being read
        assert running.result(WAIT).token_ids == expected
        assert generator.stats().queued == 2  # the one being read, the one behind it
        cancelled.cancel()
        tokenizer.gate.set()
        assert slow.result(WAIT).finish_reason == "length"
        assert cancelled.result(WAIT).finish_reason == "cancelled"
        assert (generator.stats().active, generator.stats().queued) == (0, 0)


class GatedLongTokenizer(GatedTokenizer):
    """Reading a text longer than LARGE_INPUT_CHARS waits until the test opens the gate."""

    def encode(self, text, add_special_tokens=True):
        return super().encode(self._held(text), add_special_tokens)

    def apply_chat_template(self, messages, **kwargs):
        self._held(" ".join(m["content"] for m in messages))
        return super().apply_chat_template(messages, **kwargs)

    def _held(self, text):
        if len(text) > generator_module.LARGE_INPUT_CHARS:
            self.entered.set()
            assert self.gate.wait(WAIT), "the test never opened the gate"
        return text


@pytest.mark.parametrize("chat", [False, True], ids=["prompt", "messages"])
def test_short_requests_are_not_held_behind_a_long_prompt_being_tokenized(llama, chat):
    folder, model = llama
    tokenizer = GatedLongTokenizer(folder)
    long_text = "word " * (generator_module.LARGE_INPUT_CHARS // 5 + 1)
    asked = (
        {"messages": [{"role": "user", "content": long_text}], "prompt_ids": None}
        if chat
        else {"prompt": long_text, "prompt_ids": None}
    )
    with Generator(model, tokenizer, max_batch=4) as generator:
        expected = submit(generator, prompt="Hello wo", prompt_ids=None).result(WAIT)
        long = submit(generator, **asked)
        assert tokenizer.entered.wait(WAIT)
        # a short text and a chat arrive after it and are answered while it is still read
        short = submit(generator, prompt="Hello wo", prompt_ids=None)
        assert short.result(WAIT).token_ids == expected.token_ids
        chat_reply = submit(
            generator, messages=[{"role": "user", "content": "hi"}], prompt_ids=None
        )
        assert chat_reply.result(WAIT).finish_reason == "length"
        assert generator.stats().queued == 1  # the long one, still being read
        tokenizer.gate.set()
        with pytest.raises(EngineError, match="maximum context length is 128 tokens"):
            long.result(WAIT)
        assert (generator.stats().active, generator.stats().queued) == (0, 0)


def test_closing_while_a_prompt_is_tokenized_fails_it_cleanly(llama):
    folder, model = llama
    tokenizer = GatedTokenizer(folder)
    generator = Generator(model, tokenizer)
    slow = submit(generator, prompt="slow", prompt_ids=None)
    assert tokenizer.entered.wait(WAIT)
    closing = threading.Thread(target=generator.close, kwargs={"timeout": WAIT})
    closing.start()
    generator._thread.join(WAIT)  # the worker has stopped while "slow" is still being read
    tokenizer.gate.set()
    closing.join(WAIT)
    with pytest.raises(GeneratorClosedError):
        slow.result(WAIT)
    assert generator.failure is None  # closed, not dead
    stats = generator.stats()
    assert (stats.active, stats.queued) == (0, 0)  # each request counted off once


class DecodeFaultTokenizer(Tokenizer):
    """Decoding token 77 raises (a tokenizer fault met while replaying a failover)."""

    def decode(self, ids):
        if 77 in ids:
            raise RuntimeError("simulated tokenizer fault")
        return super().decode(ids)


class Fatal(BaseException):
    """Not an Exception: nothing on the way catches it."""


class FatalTokenizer(GatedTokenizer):
    def encode(self, text, add_special_tokens=True):
        if text == "fatal":
            assert self.gate.wait(WAIT), "the test never opened the gate"
            raise Fatal("simulated: the tokenizer thread is torn down")
        return super().encode(text, add_special_tokens)


def assert_dead(generator, streams, why: str, failure: type) -> None:
    """The generator died of `failure`: its requests end saying `why`, and it takes no more."""
    for stream in streams:
        with pytest.raises(GeneratorClosedError, match=why):
            stream.result(WAIT)
    assert isinstance(generator.failure, failure)
    with pytest.raises(GeneratorClosedError):
        submit(generator)


def test_a_request_that_fails_while_being_prepared_fails_alone(llama):
    folder, model = llama
    with Generator(model, DecodeFaultTokenizer(folder), max_batch=2, max_queue=2) as generator:
        replay = submit(generator, generated_ids=[77])  # its text state is rebuilt on replay
        with pytest.raises(EngineError, match=r"cannot prepare the request.*tokenizer fault"):
            replay.result(WAIT)
        for _ in range(4):  # more than the queue holds: nothing stayed counted
            assert submit(generator).result(WAIT).finish_reason == "length"
        assert generator.failure is None


def test_a_dead_tokenizer_thread_closes_the_generator_and_reports_why(llama):
    folder, model = llama
    generator = Generator(model, FatalTokenizer(folder), max_batch=2)
    try:
        fatal = submit(generator, prompt="fatal", prompt_ids=None)
        behind = submit(generator)  # waits behind it to be read
        generator.tokenizer.gate.set()
        assert_dead(generator, [fatal, behind], "tokenizer thread died", Fatal)
    finally:
        generator.close()


def test_a_sampling_error_fails_only_the_request_it_touched(llama, monkeypatch):
    folder, model = llama
    real = generator_module.sample_rows

    def refuses_temperature_half(logits, params, seeds, indices):
        if any(p.temperature == 0.5 for p in params):
            raise RuntimeError("simulated sampling fault")
        return real(logits, params, seeds, indices)

    with Generator(model, Tokenizer(folder), max_batch=4) as generator:
        expected = submit(generator).result(WAIT).token_ids
        monkeypatch.setattr(generator_module, "sample_rows", refuses_temperature_half)
        bad = SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.5, seed=1)
        # the bad one joins while the good one decodes: they share batches
        good = submit(generator, sampling=SamplingParams(max_tokens=64, ignore_eos=True))
        failing = submit(generator, sampling=bad)
        with pytest.raises(EngineError, match=r"sampling failed.*simulated sampling fault"):
            failing.result(WAIT)
        assert good.result(WAIT).token_ids[:16] == expected
        assert submit(generator).result(WAIT).token_ids == expected  # still serving
        assert generator.failure is None
        assert (generator.stats().active, generator.stats().queued) == (0, 0)


def test_a_batch_whose_sampling_fails_once_samples_row_by_row_identically(llama, monkeypatch):
    folder, model = llama
    real = generator_module.sample_rows
    with Generator(model, Tokenizer(folder), max_batch=4) as generator:
        expected = [submit(generator, sampling=s).result(WAIT).token_ids for s in (GREEDY, SEEDED)]
        calls = {"n": 0}

        def fails_on_the_fifth_call(*args):
            calls["n"] += 1
            if calls["n"] == 5:
                raise torch.OutOfMemoryError("simulated: out of memory in a sort")
            return real(*args)

        monkeypatch.setattr(generator_module, "sample_rows", fails_on_the_fifth_call)
        streams = [submit(generator, sampling=s) for s in (GREEDY, SEEDED)]
        assert [s.result(WAIT).token_ids for s in streams] == expected
        assert calls["n"] > 5


def test_a_dead_worker_fails_its_requests_and_reports_why(llama):
    folder, model = llama
    full, go = threading.Event(), threading.Event()

    def hold_the_first_step_of_two(module, args):
        if args[0].shape[0] == 2 and not full.is_set():
            full.set()  # both requests decode (neither can have finished: 100 tokens each)
            assert go.wait(WAIT), "the test never let the step go"

    model.register_forward_pre_hook(hold_the_first_step_of_two)
    generator = Generator(model, Tokenizer(folder), max_batch=4)
    try:
        long = SamplingParams(max_tokens=100, ignore_eos=True)
        first, second = submit(generator, sampling=long), submit(generator, sampling=long)
        assert full.wait(WAIT)

        def broken_move(*args):
            raise RuntimeError("simulated device fault while moving the KV cache")

        # the first request leaving moves the second one's cache rows into its slot
        generator.cache.move = broken_move
        first.cancel()
        go.set()
        assert_dead(generator, [first, second], "the engine worker died", RuntimeError)
    finally:
        go.set()
        generator.close()
