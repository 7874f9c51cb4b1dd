"""`Generator`: one worker thread running a model with continuous batching, streams out.

    generator = Generator.from_pretrained()            # the built-in model
    stream = generator.submit(GenerationRequest(messages=[{"role": "user", "content": "Hi"}]))
    async for chunk in stream:                          # or `for chunk in stream` in a thread
        print(chunk.text, end="")

The worker owns the model and a KV cache preallocated for `max_batch` sequences. Each iteration it
takes in new requests and cancellations, runs at most one prefill chunk (`prefill_chunk` tokens) of
one joining request, then one decode step for every running sequence together, so a request joining
(however long its prompt) or finishing never stalls the others for more than one chunk.

`submit` never blocks: it raises `OverloadedError` when `max_batch + max_queue` requests are already
active or queued, and `GeneratorClosedError` after `close`. Tokenization and chat templating happen
on two more threads (the tokenizer releases the GIL), so neither the caller's event loop nor the
running requests wait for a long prompt to be read: one reads requests whose text is longer than
`LARGE_INPUT_CHARS` (a 4 MB prompt takes seconds), the other the rest, each in arrival order, so
a short request is not held behind a long one either. A stream can be cancelled at any
time (`stream.cancel()`); the request leaves the batch before the next decode step.

Failover: a request may carry `generated_ids`, tokens another host already produced after the same
prompt. They are prefilled with the prompt, count toward `max_tokens`, and feed the text stream
silently, so the continuation (greedy, or seeded sampling) and its text deltas continue exactly
where the first host stopped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mesh_node.engine.errors import (
    EngineError,
    GeneratorClosedError,
    OverloadedError,
    RequestCancelledError,
)
from mesh_node.engine.loading import TINY_MODEL_PARAMETERS, LoadPlan
from mesh_node.engine.model import Transformer
from mesh_node.engine.sampling import SamplingParams, sample_rows
from mesh_node.engine.tokenizer import TextStream, Tokenizer

log = logging.getLogger(__name__)
_request_numbers = itertools.count(1)
# Requests with more characters of text than this are tokenized on a thread of their own (about
# 30 ms of tokenizing here; a 4 MB body about 4 s), so short ones never queue behind them.
LARGE_INPUT_CHARS = 32 * 1024


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be served as given (no prompt, too long, bad token ids...)."""


class ContextLengthError(InvalidRequestError):
    """The prompt (with any tokens already generated) does not fit the model's context."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # includes tokens given as already generated (failover replay)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenChunk:
    """One streamed piece: new token ids, their text delta, and on the last chunk why it ended.

    finish_reason: None while running; "stop" (EOS, stop token or stop string), "length"
    (max_tokens or the context is full) or "cancelled". usage is set on the last chunk.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class GenerationRequest:
    """Exactly one of `messages` (chat template), `prompt` (raw text) or `prompt_ids`."""

    messages: Sequence[Mapping[str, Any]] | None = None
    prompt: str | None = None
    prompt_ids: Sequence[int] | None = None
    generated_ids: Sequence[int] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    chat_template_kwargs: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.messages, self.prompt, self.prompt_ids)]
        if sum(given) != 1:
            raise InvalidRequestError(
                "give exactly one of messages (chat), prompt (raw text) or prompt_ids"
            )
        if self.request_id is None:
            self.request_id = f"req-{next(_request_numbers)}"


@dataclass(frozen=True)
class GenerationResult:
    text: str  # text emitted by this stream (not text of replayed generated_ids)
    token_ids: tuple[int, ...]  # token ids emitted by this stream
    finish_reason: str
    usage: Usage


class RequestStream:
    """The consumer side of one request: `async for` / `for` over TokenChunks, `cancel()`.

    Used as a context manager (`with` / `async with`), leaving the block before the request
    finished cancels it, so a consumer that stops reading never leaves work in the batch.

    Chunks that pile up while the consumer is busy are merged into one on the next read, and the
    worker wakes a consumer only when it is waiting. An error in the request is raised from the
    iteration (and from `result()` / `collect()`).
    """

    def __init__(self, request_id: str, generator: Generator):
        self.request_id = request_id
        self._generator = generator
        self._chunks: collections.deque[TokenChunk] = collections.deque()
        self._cond = threading.Condition()
        self._finished = threading.Event()
        self._done = False
        self._error: BaseException | None = None
        self._sync_waiters = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._async_waiting = False
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self._cancel_asked = False  # (the generator's lock)

    # -- producer side (worker thread) --------------------------------------------------------

    def _wake(self) -> None:
        """Called with the lock held: wakes whoever waits for this stream."""
        if self._sync_waiters:
            self._cond.notify_all()
        if self._async_waiting and self._loop is not None and self._event is not None:
            self._async_waiting = False
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
                self._loop.call_soon_threadsafe(self._event.set)

    def _push(self, chunk: TokenChunk) -> None:
        with self._cond:
            if self._done:
                return
            self._chunks.append(chunk)
            if chunk.finish_reason is not None:
                self._done = True
                self.finish_reason = chunk.finish_reason
                self.usage = chunk.usage
                self._finished.set()
            self._wake()

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            if self._done:
                return
            self._done = True
            self._error = error
            self._finished.set()
            self._wake()

    # -- consumer side ------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        with self._cond:
            return self._done and not self._chunks

    def cancel(self) -> None:
        """Asks the worker to drop the request; the stream then ends with finish_reason
        'cancelled' (unless it already finished)."""
        self._generator._cancel(self)

    def _take(self) -> TokenChunk | None:
        """Merges all pending chunks (caller holds the lock); None if there are none."""
        if not self._chunks:
            return None
        if len(self._chunks) == 1:
            return self._chunks.popleft()
        chunks = list(self._chunks)
        self._chunks.clear()
        return TokenChunk(
            text="".join(c.text for c in chunks),
            token_ids=tuple(t for c in chunks for t in c.token_ids),
            finish_reason=chunks[-1].finish_reason,
            usage=chunks[-1].usage,
        )

    def __enter__(self) -> RequestStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._finished.is_set():
            self.cancel()  # the consumer left early (an error, a disconnected client)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__(*exc)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenChunk:
        while True:
            with self._cond:
                if self._event is None:
                    self._loop = asyncio.get_running_loop()
                    self._event = asyncio.Event()
                chunk = self._take()
                if chunk is not None:
                    return chunk
                if self._error is not None:
                    raise self._error
                if self._done:
                    raise StopAsyncIteration
                self._event.clear()
                self._async_waiting = True
                event = self._event
            await event.wait()

    def __iter__(self):
        while True:
            with self._cond:
                while not self._chunks and not self._done:
                    self._sync_waiters += 1
                    try:
                        self._cond.wait()
                    finally:
                        self._sync_waiters -= 1
                chunk = self._take()
                if chunk is None:
                    if self._error is not None:
                        raise self._error
                    return
            yield chunk

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Blocks until the request finishes; the whole completion (not for an event loop)."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish in {timeout}s")
        return _gather(iter(self))

    async def collect(self) -> GenerationResult:
        chunks = [chunk async for chunk in self]
        return _gather(iter(chunks))


def _gather(chunks) -> GenerationResult:
    texts, ids = [], []
    finish, usage = None, None
    for chunk in chunks:
        texts.append(chunk.text)
        ids.extend(chunk.token_ids)
        finish, usage = chunk.finish_reason or finish, chunk.usage or usage
    if finish is None or usage is None:
        raise RequestCancelledError("the stream ended without a final chunk")
    return GenerationResult("".join(texts), tuple(ids), finish, usage)


class _Sequence:
    def __init__(self, stream: RequestStream, request: GenerationRequest):
        self.stream = stream
        self.request = request
        self.params = request.sampling
        self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(62)
        self.tokens: list[int] = []  # prompt + completion; the last one may not be cached yet
        self.prompt_len = 0
        self.completion: list[int] = []
        self.cached = 0  # tokens whose keys/values are in the cache
        self.slot = -1
        self.text: TextStream | None = None
        self.released = False  # no longer counted toward the overload bound


def _input_chars(request: GenerationRequest) -> int:
    """About how much text the request gives the tokenizer (to pick its preparer)."""
    if request.prompt is not None:
        return len(request.prompt)
    if request.messages is None:
        return 0  # token ids: nothing to tokenize
    total = 0
    for message in request.messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, Sequence):
            total += sum(
                len(part["text"])
                for part in content
                if isinstance(part, Mapping) and isinstance(part.get("text"), str)
            )
    return total


class _Preparer:
    """A tokenizer thread's queue: requests not yet read, and the one it is reading."""

    def __init__(self, lock: threading.RLock, name: str):
        self.name = name
        self.cond = threading.Condition(lock)  # its thread waits on it
        self.inbox: collections.deque[_Sequence] = collections.deque()  # not yet tokenized
        self.preparing: _Sequence | None = None
        self.thread: threading.Thread | None = None


@dataclass(frozen=True)
class GeneratorStats:
    active: int
    queued: int
    max_batch: int
    max_queue: int
    max_seq_len: int
    decode_steps: int
    tokens_generated: int
    weight_bytes: int  # resident model weights
    kv_cache_bytes: int  # the preallocated cache


class Generator:
    """Continuous-batching generation over one model, on one worker thread (see module doc)."""

    def __init__(
        self,
        model: Transformer | None = None,
        tokenizer: Tokenizer | None = None,
        *,
        loader: Callable[[], tuple[Transformer, Tokenizer]] | None = None,
        max_batch: int = 8,
        max_queue: int = 64,
        max_seq_len: int | None = None,
        prefill_chunk: int = 256,
        threads: int | None = None,
        name: str = "mesh-engine",
    ):
        """Either a loaded `model` and its `tokenizer`, or a `loader` returning both, which then
        runs on the worker thread (so that all torch work, loading included, stays off the
        caller's thread: on CPU that also keeps OpenMP thread pools from competing).
        Returns once the worker is ready; loading and validation errors are raised here."""
        if loader is None and (model is None or tokenizer is None):
            raise ValueError("give a model and its tokenizer, or a loader")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.threads = threads
        self._wanted_threads: int | None = None  # set_decode_threads
        lock = threading.RLock()  # (as a bare Condition has)
        self._cond = threading.Condition(lock)  # the worker waits on it
        # short requests, long ones (LARGE_INPUT_CHARS)
        self._preparers = (_Preparer(lock, f"{name}-tokenizer"), _Preparer(lock, f"{name}-reader"))
        self._prepared: collections.deque[_Sequence] = collections.deque()  # for the worker
        self._failure: BaseException | None = None  # what killed the worker
        self._cancels: set[RequestStream] = set()
        self._count = 0  # active + queued, for the overload bound
        self._closed = False
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._prefilling: _Sequence | None = None
        self._decoding: list[_Sequence] = []  # index == cache slot
        self._decode_steps = 0
        self._tokens_generated = 0
        self._ready = threading.Event()
        self._setup_error: BaseException | None = None
        self._close_error: BaseException = GeneratorClosedError("the generator was closed")
        self._thread = threading.Thread(
            target=self._run,
            args=(loader or (lambda: (model, tokenizer)), max_seq_len),
            name=name,
            daemon=True,
        )
        self._thread.start()
        self._ready.wait()
        if self._setup_error is not None:
            self._thread.join()
            raise self._setup_error
        for preparer in self._preparers:
            preparer.thread = threading.Thread(
                target=self._prepare_loop, args=(preparer,), name=preparer.name, daemon=True
            )
            preparer.thread.start()

    def _setup(self, model: Transformer, tokenizer: Tokenizer, max_seq_len: int | None) -> None:
        if model.embed_tokens is None or not model.has_head:
            raise ValueError("generation needs a model loaded with its embeddings and head")
        if len(model.layer_indices) != model.args.num_layers:
            raise ValueError("generation needs every layer of the model (load without `layers`)")
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = min(max_seq_len or model.max_seq_len, model.max_seq_len)
        self.prefill_threads = torch.get_num_threads()
        if self.threads is None:
            # a tiny model's step is hundreds of microsecond-sized ops: a second intra-op thread
            # costs more in synchronization than it saves. Larger models use every core.
            tiny = model.args.parameter_count()["total"] < TINY_MODEL_PARAMETERS
            self.threads = 1 if tiny and model.device.type == "cpu" else torch.get_num_threads()
        self._own_threads = self.threads
        torch.set_num_threads(self.threads)  # intra-op threads of this (worker) thread
        self.eos_ids = frozenset(tokenizer.eos_token_ids) | frozenset(model.args.eos_token_ids)
        self.cache = model.new_cache(self.max_batch, self.max_seq_len)

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        *,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        max_seq_len: int | None = 4096,
        plan: LoadPlan | None = None,
        **options: Any,
    ) -> Generator:
        """Resolves `model` (None: the built-in model; a folder; a Hugging Face repo id), then
        loads it on the generator's worker thread. `plan` selects experts (it must keep every
        layer, embeddings and head); `LoadPlan(experts=..., restrict_router=True)` serves with
        only those experts (independent-shard mode). Options are Generator keyword arguments."""
        from mesh_node.engine.catalog import resolve_model
        from mesh_node.engine.loading import load_model

        resolved = resolve_model(model)

        def loader() -> tuple[Transformer, Tokenizer]:
            loaded = load_model(
                resolved.path, plan=plan, dtype=dtype, device=device, max_seq_len=max_seq_len
            )
            return loaded, Tokenizer(resolved.path, extra_eos_ids=loaded.args.eos_token_ids)

        return cls(loader=loader, **options)

    # -- public API (any thread) --------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queues a request; returns its stream at once. Raises OverloadedError when full."""
        assert request.request_id is not None
        stream = RequestStream(request.request_id, self)
        sequence = _Sequence(stream, request)
        with self._cond:
            if self._closed:
                raise GeneratorClosedError("the generator is closed")
            limit = self.max_batch + self.max_queue
            if self._count >= limit:
                raise OverloadedError(
                    f"overloaded: {self._count} requests are active or queued (limit {limit}); "
                    f"retry later or on another node"
                )
            self._count += 1
            preparer = self._preparers[_input_chars(request) > LARGE_INPUT_CHARS]
            preparer.inbox.append(sequence)
            preparer.cond.notify()
        return stream

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Submits and blocks until done (not for use on an event loop)."""
        return self.submit(request).result()

    def stats(self) -> GeneratorStats:
        with self._cond:
            queued = (
                sum(
                    len(p.inbox) + (p.preparing is not None and not p.preparing.released)
                    for p in self._preparers
                )
                + len(self._prepared)
                + len(self._waiting)
            )
            return GeneratorStats(
                active=self._count - queued,
                queued=queued,
                max_batch=self.max_batch,
                max_queue=self.max_queue,
                max_seq_len=self.max_seq_len,
                decode_steps=self._decode_steps,
                tokens_generated=self._tokens_generated,
                weight_bytes=self.model.weight_bytes(),
                kv_cache_bytes=self.cache.nbytes,
            )

    @property
    def decode_threads_override(self) -> int | None:
        """What `set_decode_threads` asked for last (None: the engine's own choice)."""
        return self._wanted_threads

    def set_decode_threads(self, threads: int | None) -> None:
        """Intra-op threads for decode steps from the next step on; None: the engine's own
        choice again (see `threads`). Prefill chunks keep using every thread."""
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self._wanted_threads = threads

    @property
    def failure(self) -> BaseException | None:
        """What killed the worker (a bug or a device fault: the generator then takes no more
        requests and must be replaced), or None while it runs or after a plain `close`."""
        return self._failure

    def close(self, timeout: float | None = 10.0) -> None:
        """Stops the worker; unfinished requests end with GeneratorClosedError."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            for preparer in self._preparers:
                preparer.cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        for preparer in self._preparers:
            thread = preparer.thread
            if thread is not None and threading.current_thread() is not thread:
                thread.join(timeout)

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _cancel(self, stream: RequestStream) -> None:
        with self._cond:
            stream._cancel_asked = True  # (for the preparer: the worker has not seen it yet)
            self._cancels.add(stream)
            self._cond.notify()

    # -- worker -------------------------------------------------------------------------------

    def _run(self, loader, max_seq_len: int | None) -> None:
        try:
            with torch.inference_mode():
                self._setup(*loader(), max_seq_len)
        except BaseException as exc:
            self._setup_error = exc
            self._closed = True
            self._ready.set()
            return
        self._ready.set()
        try:
            with torch.inference_mode():
                while self._iteration():
                    pass
            died = None
        except BaseException as exc:  # the worker must report, whatever happened
            log.exception("engine worker died")
            died = exc
        with self._cond:
            self._closed = True
            if died is not None:
                self._died(died, "the engine worker")
            # closed, or what died (a preparer fails the request it is reading with it)
            error = self._close_error
            pending = [*self._prepared, *self._waiting, *self._decoding]
            for preparer in self._preparers:
                preparer.cond.notify()
                pending.extend(preparer.inbox)
                preparer.inbox.clear()
            if self._prefilling is not None:
                pending.append(self._prefilling)
            self._prepared.clear()
            self._waiting.clear()
            self._decoding.clear()
            self._prefilling = None
            for sequence in pending:  # (the one being tokenized stays counted: the preparer
                if not sequence.released:  # fails it when it is done)
                    sequence.released = True
                    self._count -= 1
        for sequence in pending:
            sequence.stream._fail(error)

    def _iteration(self) -> bool:
        with self._cond:
            while (
                not self._closed
                and not self._prepared
                and not self._cancels
                and not self._waiting
                and self._prefilling is None
                and not self._decoding
            ):
                self._cond.wait()
            if self._closed:
                return False
            self._waiting.extend(self._prepared)
            self._prepared.clear()
            cancels, self._cancels = self._cancels, set()
        if cancels:
            self._apply_cancels(cancels)
        wanted = self._wanted_threads or self._own_threads
        if wanted != self.threads:
            self.threads = wanted
            torch.set_num_threads(wanted)
        # prefill up to `prefill_chunk` tokens (of one or several joining requests), then one
        # decode step for everyone: short prompts that arrive together start decoding together,
        # and a long prompt delays the running requests by at most one chunk per step
        budget = self.prefill_chunk
        while budget > 0:
            if self._prefilling is None:
                self._admit()
            if self._prefilling is None:
                break
            budget -= self._prefill_step(budget)
        if self._decoding:
            self._decode_step()
        return True

    def _release(self, sequence: _Sequence) -> None:
        with self._cond:
            if not sequence.released:
                sequence.released = True
                self._count -= 1

    def _finish(self, sequence: _Sequence, reason: str, text: str = "", ids=()) -> None:
        if reason != "cancelled" and sequence.text is not None:
            text += sequence.text.finish()
        usage = Usage(sequence.prompt_len, len(sequence.completion))
        self._release(sequence)  # before the consumer can see the end
        sequence.stream._push(TokenChunk(text, tuple(ids), reason, usage))

    def _fail(self, sequence: _Sequence, error: BaseException) -> None:
        self._release(sequence)
        sequence.stream._fail(error)

    def _apply_cancels(self, streams: set[RequestStream]) -> None:
        kept = collections.deque()
        for sequence in self._waiting:
            if sequence.stream in streams:
                self._finish(sequence, "cancelled")
            else:
                kept.append(sequence)
        self._waiting = kept
        if self._prefilling is not None and self._prefilling.stream in streams:
            self._finish(self._prefilling, "cancelled")
            self._prefilling = None
        for sequence in list(self._decoding):
            if sequence.stream in streams:
                self._remove_decoding(sequence)
                self._finish(sequence, "cancelled")

    def _remove_decoding(self, sequence: _Sequence) -> None:
        """Frees the sequence's slot, moving the last decoding sequence into it."""
        slot = sequence.slot
        last = self._decoding[-1]
        if last is not sequence:
            self.cache.move(last.slot, slot, last.cached)
            last.slot = slot
            self._decoding[slot] = last
        self._decoding.pop()

    def _prepare(self, sequence: _Sequence) -> bool:
        """Tokenizes and validates a request; False if it was failed or already complete."""
        request = sequence.request
        try:
            if request.messages is not None:
                prompt = self.tokenizer.apply_chat_template(
                    request.messages, **(request.chat_template_kwargs or {})
                )
            elif request.prompt is not None:
                prompt = self.tokenizer.encode(request.prompt)
            else:
                prompt = [int(t) for t in request.prompt_ids or ()]
            generated = [int(t) for t in request.generated_ids]
            if not prompt:
                raise InvalidRequestError("the prompt is empty")
            total = len(prompt) + len(generated)
            if total > self.max_seq_len:  # max_seq_len tokens fit the cache: one more comes
                raise ContextLengthError(  # (worded as OpenAI's, which clients look for)
                    f"This model's maximum context length is {self.max_seq_len} tokens, but "
                    f"the prompt has {len(prompt)} tokens"
                    + (f" (+ {len(generated)} already generated)" if generated else "")
                    + ": shorten it"
                )
            vocab = self.model.args.vocab_size
            bad = [t for t in prompt + generated if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(
                    f"token ids {bad[:5]} are outside the vocabulary 0..{vocab - 1}"
                )
        except EngineError as exc:
            self._fail(sequence, exc)
            return False
        except Exception as exc:  # a template or tokenizer error is the request's problem
            self._fail(sequence, InvalidRequestError(f"cannot tokenize the request: {exc}"))
            return False
        sequence.prompt_len = len(prompt)
        sequence.tokens = prompt + generated
        sequence.completion = list(generated)
        sequence.text = TextStream(self.tokenizer, prompt, sequence.params.stop)
        for token in generated:  # rebuild the text state the first host had
            sequence.text.add(token)
        if sequence.text.stopped or len(generated) >= sequence.params.max_tokens:
            self._finish(sequence, "stop" if sequence.text.stopped else "length")
            return False
        return True

    def _prepare_loop(self, preparer: _Preparer) -> None:
        """A preparer thread: tokenizes its requests in arrival order and hands them to the
        worker; a request cancelled meanwhile ends here. Should it die, the generator is
        closed with `failure` set, as when the worker dies: no request waits for ever."""
        try:
            self._prepare_requests(preparer)
        except BaseException as exc:
            log.exception("engine tokenizer thread died")
            with self._cond:
                self._died(exc, "the engine's tokenizer thread")
                self._closed = True
                self._cond.notify()  # the worker fails every request left
                for other in self._preparers:
                    other.cond.notify()
                preparing, preparer.preparing = preparer.preparing, None
            if preparing is not None:
                self._fail(preparing, self._close_error)

    def _died(self, exc: BaseException, what: str) -> None:
        """(Under the lock.) `what` died of `exc`: the first death is the generator's failure,
        and what every request left is failed with."""
        if self._failure is None:
            self._failure = exc
            self._close_error = GeneratorClosedError(f"{what} died: {exc!r}")

    def _prepare_requests(self, preparer: _Preparer) -> None:
        while True:
            with self._cond:
                while not self._closed and not preparer.inbox:
                    preparer.cond.wait()
                if self._closed:
                    return
                sequence = preparer.preparing = preparer.inbox.popleft()
                skip = sequence.stream._cancel_asked
            if skip:
                ready = False
                self._finish(sequence, "cancelled")
            else:
                try:
                    ready = self._prepare(sequence)
                except Exception as exc:  # e.g. replaying generated_ids through the detokenizer
                    log.exception("preparing %s failed", sequence.stream.request_id)
                    self._fail(sequence, EngineError(f"cannot prepare the request: {exc!r}"))
                    ready = False
            with self._cond:
                preparer.preparing = None
                closed, cancelled = self._closed, sequence.stream._cancel_asked
                if ready and not closed and not cancelled:
                    self._prepared.append(sequence)
                    self._cond.notify()
            if ready and closed:
                self._fail(sequence, self._close_error)
            elif ready and cancelled:
                self._finish(sequence, "cancelled")

    def _admit(self) -> None:
        if self._waiting and len(self._decoding) < self.max_batch:
            sequence = self._waiting.popleft()
            sequence.slot = len(self._decoding)
            self._prefilling = sequence

    def _prefill_step(self, budget: int) -> int:
        """Prefills up to `budget` tokens of the joining request; returns how many it ran."""
        sequence = self._prefilling
        assert sequence is not None
        start = sequence.cached
        end = min(len(sequence.tokens), start + budget)
        device = self.model.device
        tokens = torch.tensor([sequence.tokens[start:end]], device=device)
        positions = torch.arange(start, end, device=device)[None]
        # a prefill chunk is real work: all cores, even when decode steps use fewer
        wide = self.prefill_threads > self.threads and end - start >= 32
        try:
            if wide:
                torch.set_num_threads(self.prefill_threads)
            logits = self.model(
                tokens, positions, self.cache, slot_start=sequence.slot, kv_len=end, last_only=True
            )
        except Exception as exc:
            self._prefilling = None
            self._fail(sequence, _forward_error(exc, f"prefill for {sequence.stream.request_id}"))
            return end - start
        finally:
            if wide:
                torch.set_num_threads(self.threads)
        sequence.cached = end
        if end < len(sequence.tokens):
            return end - start
        self._prefilling = None
        slot = len(self._decoding)
        if sequence.slot != slot:
            self.cache.move(sequence.slot, slot, sequence.cached)
            sequence.slot = slot
        self._decoding.append(sequence)
        self._take_tokens([sequence], logits)
        return end - start

    def _decode_step(self) -> None:
        batch = self._decoding
        device = self.model.device
        tokens = torch.tensor([[s.tokens[-1]] for s in batch], device=device)
        positions = torch.tensor([[s.cached] for s in batch], device=device)
        kv_len = max(s.cached for s in batch) + 1
        try:
            logits = self.model(
                tokens, positions, self.cache, slot_start=0, kv_len=kv_len, last_only=True
            )
        except Exception as exc:
            error = _forward_error(exc, "decode step")
            for sequence in list(batch):
                self._fail(sequence, error)
            batch.clear()
            return
        self._decode_steps += 1
        for sequence in batch:
            sequence.cached += 1
        self._take_tokens(list(batch), logits)

    def _take_tokens(self, batch: list[_Sequence], logits: torch.Tensor) -> None:
        """Samples each decoding sequence's next token from its row of `logits` and streams
        it; finished sequences leave the batch. An error here (a bug, a tokenizer fault,
        memory) fails only the sequences it touched; the worker goes on."""
        try:
            tokens: list[int | Exception] = list(
                sample_rows(
                    logits,
                    [s.params for s in batch],
                    [s.seed for s in batch],
                    [len(s.completion) for s in batch],
                )
            )
        except Exception:
            log.exception("sampling failed for a batch of %d: sampling row by row", len(batch))
            tokens = [self._sample_alone(s, logits[row : row + 1]) for row, s in enumerate(batch)]
        leaving = []
        for sequence, token in zip(batch, tokens, strict=True):
            try:
                if isinstance(token, Exception):
                    raise token
                if self._accept(sequence, token):
                    leaving.append(sequence)
            except Exception as exc:
                log.exception("taking a token failed for %s", sequence.stream.request_id)
                self._fail(sequence, EngineError(f"sampling failed: {exc!r}"))
                leaving.append(sequence)
        for sequence in leaving:
            self._remove_decoding(sequence)

    def _sample_alone(self, sequence: _Sequence, logits: torch.Tensor) -> int | Exception:
        # (seeded sampling draws per row: alone, a row samples what it would in the batch)
        try:
            return sample_rows(
                logits, [sequence.params], [sequence.seed], [len(sequence.completion)]
            )[0]
        except Exception as exc:
            return exc

    def _accept(self, sequence: _Sequence, token: int) -> bool:
        """Appends a sampled token and streams it; True if the sequence finished."""
        self._tokens_generated += 1
        params = sequence.params
        sequence.tokens.append(token)
        sequence.completion.append(token)
        assert sequence.text is not None
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            self._finish(sequence, "stop", "", (token,))
            return True
        delta = sequence.text.add(token)
        if sequence.text.stopped:
            self._finish(sequence, "stop", delta, (token,))
            return True
        if len(sequence.completion) >= params.max_tokens or len(sequence.tokens) > self.max_seq_len:
            self._finish(sequence, "length", delta, (token,))
            return True
        sequence.stream._push(TokenChunk(delta, (token,)))
        return False


def _forward_error(exc: Exception, what: str) -> EngineError:
    """The error a failed forward pass fails its sequences with, logged: the engine's own
    (said on purpose: experts with no live holder) as it is, anything else wrapped, with its
    traceback in the log."""
    if isinstance(exc, EngineError):
        log.warning("%s failed: %s", what, exc)
        return exc
    log.exception("%s failed", what)
    return EngineError(f"{what} failed: {exc!r}")
