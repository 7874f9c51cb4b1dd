"""What serving passes around: one completion request, the deltas of its answer, and the
errors a client can get (each with its HTTP status and OpenAI error fields).

The HTTP layer turns OpenAI JSON into a `CompletionRequest`; a `Backend` turns that into a
stream of `Delta`s, whether the model runs here or on a host across the mesh.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from mesh_node.engine.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """One request: chat `messages` or a raw `prompt` (exactly one), sampling, and
    `generated_ids` (tokens another host already produced: failover replay)."""

    model: str
    request_id: str
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    user: str | None = None
    generated_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a completion request has exactly one of messages and prompt")


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of the answer. The last one has `finish_reason` ("stop" or "length") and the
    token counts (prompt; completion including any replayed tokens)."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class Backend(Protocol):
    """Where completions come from: the local engine, or the mesh (routing, tunnels)."""

    def model_ids(self) -> list[str]:
        """Models a client can ask for, sorted."""
        ...

    def stream(
        self, request: CompletionRequest
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[Delta]]:
        """`async with backend.stream(req) as deltas: async for d in deltas`. Leaving the
        block early cancels the generation. Raises ServingError (before or during)."""
        ...


CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # also the reason of the Error that says so
EXPERTS_UNAVAILABLE = "experts_unavailable"  # likewise


class ServingError(Exception):
    """An error for the client, in OpenAI's shape: HTTP status, type, message, param, code."""

    status = 500
    type = "server_error"
    code: str | None = None
    retry_after: int | None = None  # seconds, sent as Retry-After (clients that honour it wait)

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(ServingError):
    status, type, code = 400, "invalid_request_error", "invalid_value"


class ContextLengthExceeded(BadRequest):
    """The prompt does not fit the model's context (OpenAI's code, which clients look for)."""

    code = CONTEXT_LENGTH_EXCEEDED


class Unauthorized(ServingError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class ModelNotFound(ServingError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class Overloaded(ServingError):
    status, type, code = 429, "rate_limit_error", "overloaded"
    retry_after = 1


class NoHostAvailable(ServingError):
    status, type, code = 503, "server_error", "no_host_available"


class ExpertsMissing(ServingError):
    """Experts of the model (spread over the mesh) have no live holder: no host can answer
    until some node holds them again (the message says which)."""

    status, type, code = 503, "server_error", EXPERTS_UNAVAILABLE


class GenerationFailed(ServingError):
    """The generation broke off and could not be continued elsewhere."""

    status, type, code = 502, "server_error", "generation_failed"
