"""The tunnel: a completion sent to its host over a QUIC stream, tokens streamed back.

The host side serves `Generate` from the models it hosts (`LocalModels`); the caller side
turns the host's `GenerateChunk`s back into `Delta`s. Flow control is the transport's:
a slow client slows the host. Cancelling the caller's stream (client gone) resets the QUIC
stream, which cancels the generation on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from mesh_node.engine.sampling import SamplingParams
from mesh_node.serving.local import LocalModels
from mesh_node.serving.messages import ChatTurn, Generate, GenerateChunk
from mesh_node.serving.requests import (
    CONTEXT_LENGTH_EXCEEDED,
    EXPERTS_UNAVAILABLE,
    BadRequest,
    ChatMessage,
    CompletionRequest,
    ContextLengthExceeded,
    Delta,
    ExpertsMissing,
    GenerationFailed,
    ModelNotFound,
    NoHostAvailable,
    Overloaded,
)
from mesh_node.transport.connection import INITIAL_CREDIT, Connection, Handlers, RequestContext
from mesh_node.transport.errors import (
    ErrorCode,
    ProtocolError,
    RemoteError,
    RequestFailed,
    TransportError,
)


class HostFailed(Exception):
    """The host could not finish this request (gone, unloading, failed): try another."""


class HostNotServing(HostFailed):
    """The host does not serve the model (any more, or not yet): the caller's view of it is
    stale. Worth trying again once its gossiped state changes."""


class HostBusy(Exception):
    """The host is at capacity: try another, or tell the client to retry."""


def to_wire(request: CompletionRequest) -> Generate:
    s = request.sampling
    return Generate(
        request_id=request.request_id,
        model=request.model,
        messages=[ChatTurn(m.role, m.content) for m in request.messages]
        if request.messages is not None
        else None,
        prompt=request.prompt,
        generated_ids=list(request.generated_ids),
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed,
        stop=list(s.stop),
        ignore_eos=s.ignore_eos,
    )


def from_wire(message: Generate) -> CompletionRequest:
    """Raises ValueError when the request cannot be served as given."""
    sampling = SamplingParams(
        max_tokens=message.max_tokens,
        temperature=message.temperature,
        top_p=message.top_p,
        top_k=message.top_k,
        seed=message.seed,
        stop=tuple(message.stop),
        ignore_eos=message.ignore_eos,
    )
    messages = (
        tuple(ChatMessage(t.role, t.content) for t in message.messages)
        if message.messages is not None
        else None
    )
    return CompletionRequest(
        model=message.model,
        request_id=message.request_id,
        messages=messages,
        prompt=message.prompt,
        sampling=sampling,
        generated_ids=tuple(message.generated_ids),
    )


class TunnelHost:
    """Serves `Generate` requests for the models this node hosts."""

    def __init__(self, handlers: Handlers, local: LocalModels):
        self.local = local
        self._active = 0  # generations being served
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        handlers.on_stream(Generate, self._serve)

    async def drain(self, timeout: float) -> None:
        """Before the node leaves: refuse new generations (as not serving: their callers try
        another host) and give those under way up to `timeout` seconds to finish, as the
        API gives its own clients."""
        self._closing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()

    async def _serve(self, ctx: RequestContext, message: Generate) -> AsyncIterator[GenerateChunk]:
        if self._closing:
            raise RequestFailed(ErrorCode.NOT_FOUND, "this node is leaving the mesh")
        try:
            request = from_wire(message)
        except ValueError as exc:
            raise RequestFailed(ErrorCode.BAD_REQUEST, str(exc)) from None
        self._active += 1
        self._idle.clear()
        try:
            async for chunk in self._generate(request):
                yield chunk
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _generate(self, request: CompletionRequest) -> AsyncIterator[GenerateChunk]:
        try:
            async with self.local.stream(request) as deltas:
                async for delta in deltas:
                    yield GenerateChunk(
                        text=delta.text,
                        token_ids=list(delta.token_ids),
                        finish_reason=delta.finish_reason,
                        prompt_tokens=delta.prompt_tokens,
                        completion_tokens=delta.completion_tokens,
                    )
        except ModelNotFound as exc:
            raise RequestFailed(ErrorCode.NOT_FOUND, exc.message) from None
        except Overloaded as exc:
            raise RequestFailed(ErrorCode.OVERLOADED, exc.message) from None
        except BadRequest as exc:
            raise RequestFailed(ErrorCode.BAD_REQUEST, exc.message, _reason(exc)) from None
        except ExpertsMissing as exc:
            raise RequestFailed(ErrorCode.UNAVAILABLE, exc.message, EXPERTS_UNAVAILABLE) from None
        except (NoHostAvailable, GenerationFailed) as exc:
            raise RequestFailed(ErrorCode.UNAVAILABLE, exc.message) from None


def _reason(exc: BadRequest) -> str:
    """The Error's reason for a refused request: OpenAI's code where a client looks for it."""
    return CONTEXT_LENGTH_EXCEEDED if isinstance(exc, ContextLengthExceeded) else ""


async def stream_from_host(
    conn: Connection, request: CompletionRequest, *, item_timeout: float
) -> AsyncIterator[Delta]:
    """The host's answer as Deltas. Raises BadRequest (the request itself is wrong),
    HostBusy, or HostFailed (anything else: try another host)."""
    try:
        # the initial credit (64 KiB) is many answers' worth of text: no Credit frame needed
        async with conn.stream(
            to_wire(request), timeout=item_timeout, window=INITIAL_CREDIT
        ) as chunks:
            async for chunk in chunks:
                if not isinstance(chunk, GenerateChunk):
                    raise HostFailed(f"host answered with {type(chunk).__name__}")
                yield Delta(
                    text=chunk.text,
                    token_ids=tuple(chunk.token_ids),
                    finish_reason=chunk.finish_reason,
                    prompt_tokens=chunk.prompt_tokens,
                    completion_tokens=chunk.completion_tokens,
                )
    except RemoteError as exc:
        if exc.code == ErrorCode.BAD_REQUEST and exc.reason == CONTEXT_LENGTH_EXCEEDED:
            param = "messages" if request.messages is not None else "prompt"
            raise ContextLengthExceeded(exc.message, param) from None
        if exc.code == ErrorCode.BAD_REQUEST:
            raise BadRequest(exc.message) from None
        if exc.code == ErrorCode.UNAVAILABLE and exc.reason == EXPERTS_UNAVAILABLE:
            raise ExpertsMissing(exc.message) from None  # another host would meet the same mesh
        if exc.code == ErrorCode.FRAME_TOO_LARGE:  # any host would refuse it: not a failure
            raise _too_large(exc.message) from None
        if exc.code == ErrorCode.OVERLOADED:
            raise HostBusy(exc.message) from None
        if exc.code == ErrorCode.NOT_FOUND:
            raise HostNotServing(exc.message) from None
        raise HostFailed(f"{ErrorCode.describe(exc.code)}: {exc.message}") from None
    except ProtocolError as exc:
        if exc.code == ErrorCode.FRAME_TOO_LARGE:  # refused before sending: no host takes it
            raise _too_large(exc.message) from None
        raise HostFailed(str(exc)) from None
    except (TransportError, TimeoutError) as exc:
        raise HostFailed(str(exc) or "no answer in time") from None


def _too_large(why: str) -> BadRequest:
    return BadRequest(f"the request is too large to pass to the host ({why}): shorten it")
