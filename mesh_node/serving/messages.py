"""Serving messages (type ids 0x60-0x7F): a completion tunneled to a host, token by token."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Generate:
    """Run a completion on the host; answered by a stream of GenerateChunk (credit flow
    control: a slow client slows the host). Exactly one of `messages` and `prompt`.
    `generated_ids` are tokens already produced elsewhere for this request (failover):
    the host continues after them."""

    request_id: str
    model: str
    messages: list[ChatTurn] | None = None
    prompt: str | None = None
    generated_ids: list[int] = field(default_factory=list)
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class GenerateChunk:
    """New tokens and their text; the last chunk has finish_reason and the token counts."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


SERVING_MESSAGES: dict[int, type] = {
    0x60: Generate,
    0x61: GenerateChunk,
}
