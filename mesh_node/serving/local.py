"""The local backend: models this node hosts, each run by an engine `Generator`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from mesh_node.engine import (
    ContextLengthError,
    EngineError,
    ExpertsUnavailable,
    GenerationRequest,
    Generator,
    GeneratorClosedError,
    InvalidRequestError,
    OverloadedError,
    RequestStream,
)
from mesh_node.serving.requests import (
    BadRequest,
    CompletionRequest,
    ContextLengthExceeded,
    Delta,
    ExpertsMissing,
    GenerationFailed,
    ModelNotFound,
    NoHostAvailable,
    Overloaded,
)


class LocalModels:
    """Generators by model name. A `Backend` for the models hosted here."""

    def __init__(self) -> None:
        self.generators: dict[str, Generator] = {}

    def model_ids(self) -> list[str]:
        return sorted(self.generators)

    def inflight(self) -> int:
        """Requests active or queued in every generator here (for load reports)."""
        total = 0
        for generator in self.generators.values():
            stats = generator.stats()
            total += stats.active + stats.queued
        return total

    @contextlib.asynccontextmanager
    async def stream(self, request: CompletionRequest) -> AsyncIterator[AsyncIterator[Delta]]:
        generator = self.generators.get(request.model)
        if generator is None:
            raise ModelNotFound(f"model {request.model!r} is not hosted on this node", "model")
        try:
            stream = generator.submit(_engine_request(request))
        except OverloadedError as exc:
            raise Overloaded(f"{request.model} is busy: {exc}") from None
        except GeneratorClosedError:
            raise NoHostAvailable(f"{request.model} is shutting down on this node") from None
        except InvalidRequestError as exc:
            raise _refused(exc, request) from None
        async with stream:
            yield _deltas(stream, request)


def _engine_request(request: CompletionRequest) -> GenerationRequest:
    messages = (
        [{"role": m.role, "content": m.content} for m in request.messages]
        if request.messages is not None
        else None
    )
    return GenerationRequest(
        messages=messages,
        prompt=request.prompt,
        generated_ids=request.generated_ids,
        sampling=request.sampling,
        request_id=request.request_id,
    )


def _refused(exc: InvalidRequestError, request: CompletionRequest) -> BadRequest:
    # (the engine refuses a request for its prompt only: empty, too long, not tokenizable)
    param = "messages" if request.messages is not None else "prompt"
    if isinstance(exc, ContextLengthError):
        return ContextLengthExceeded(str(exc), param)
    return BadRequest(str(exc), param)


async def _deltas(stream: RequestStream, request: CompletionRequest) -> AsyncIterator[Delta]:
    try:
        async for chunk in stream:
            usage = chunk.usage
            yield Delta(
                text=chunk.text,
                token_ids=tuple(chunk.token_ids),
                finish_reason=chunk.finish_reason,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
            )
    except InvalidRequestError as exc:  # e.g. the prompt is longer than the context
        raise _refused(exc, request) from None
    except (GeneratorClosedError, OverloadedError) as exc:
        raise GenerationFailed(f"generation stopped: {exc}") from None
    except ExpertsUnavailable as exc:  # (no other host would do better: the client is told)
        raise ExpertsMissing(f"{request.model}: {exc}") from None
    except EngineError as exc:  # e.g. out of memory in a step: another host may manage
        raise GenerationFailed(f"generation failed: {exc}") from None
