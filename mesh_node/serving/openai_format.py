"""OpenAI's JSON on both sides of a completion: request bodies in, response objects out.

In: `decode_body(raw)` then `parse_chat_completion(body, ...)` / `parse_completion(body, ...)`
turn a request body into a `ParsedRequest` (a `CompletionRequest` plus the streaming options),
or raise `BadRequest` whose `param` names the offending field. Nothing else escapes them.

Fields we cannot honour are rejected, never silently dropped, unless they sit at the value
that leaves the output unchanged (`n: 1`, `logprobs: false`, penalties 0, `response_format:
{"type": "text"}`, ...). Fields OpenAI does not define are ignored. `null` means "not given".

Out: `ChatFormat` / `CompletionFormat` build the `chat.completion(.chunk)` and
`text_completion` objects; `sse_event` frames one server-sent event.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from typing import Any

from mesh_node.engine.sampling import SamplingParams
from mesh_node.serving.requests import BadRequest, ChatMessage, CompletionRequest, Delta

DEFAULT_MAX_TOKENS_LIMIT = 32768
MAX_STOP_SEQUENCES = 4
OPENAI_DEFAULT_TEMPERATURE = 1.0  # what OpenAI uses when a request gives none
_SEED_RANGE = (-(2**63), 2**63 - 1)  # int64: what every wire format carries
# roles a chat template knows; "developer" is OpenAI's newer name for "system"
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A request body understood: what to generate, and how the client wants it back."""

    completion: CompletionRequest
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a final usage chunk


TOP_K_LIMIT = 2**31 - 1  # larger than any vocabulary: 0 and this both mean "all tokens"


def new_request_id(prefix: str) -> str:
    """`chatcmpl-…` / `cmpl-…`: 24 random hex digits, unique per request."""
    return f"{prefix}{secrets.token_hex(12)}"


def decode_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or BadRequest saying why it is not one."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8 text") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, or an integer literal too long
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, not {_json_type(body)}")
    try:  # JSON may escape lone surrogates ("\ud800"), which no text may hold
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("the request body holds invalid Unicode (a lone surrogate)") from None
    return body


def _no_constant(name: str) -> Any:
    """NaN, Infinity and -Infinity: Python's json reads them, JSON has no such values."""
    raise ValueError(f"{name} is not a JSON value")


# -- requests ---------------------------------------------------------------------------------


def parse_chat_completion(
    body: Any,
    *,
    request_id: str | None = None,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
) -> ParsedRequest:
    """A `POST /v1/chat/completions` body -> ParsedRequest (raises BadRequest)."""
    fields = _Fields(body)
    model = fields.model()
    messages = _messages(fields.required("messages"))
    fields.at_most_one("n", 1)
    fields.unsupported_unless("logprobs", (False,), "log probabilities are not supported")
    fields.unsupported_unless("top_logprobs", (0,), "log probabilities are not supported")
    fields.unsupported_unless("tools", ([],), "tools (function calling) are not supported")
    fields.unsupported_unless("functions", ([],), "function calling is not supported")
    fields.unsupported_unless(
        "tool_choice", ("none", "auto"), "tools (function calling) are not supported"
    )
    fields.unsupported_unless(
        "function_call", ("none", "auto"), "function calling is not supported"
    )
    fields.unsupported_unless(
        "response_format", ({"type": "text"},), "only plain text responses are supported"
    )
    fields.unsupported_unless("modalities", (["text"],), "only text output is supported")
    fields.unsupported_unless("audio", (), "audio output is not supported")
    fields.unsupported_unless("web_search_options", (), "web search is not supported")
    fields.unsupported_unless(
        "reasoning_effort", (), "reasoning effort is not supported (not a reasoning model)"
    )
    fields.unsupported_unless("verbosity", ("medium",), "verbosity is not supported")
    fields.unsupported_unless("store", (False,), "stored completions are not supported")
    return _parsed(
        fields,
        CompletionRequest(
            model=model,
            request_id=request_id or new_request_id("chatcmpl-"),
            messages=messages,
            sampling=_sampling(fields, max_tokens_limit),
            user=fields.string("user"),
        ),
    )


def parse_completion(
    body: Any,
    *,
    request_id: str | None = None,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
) -> ParsedRequest:
    """A `POST /v1/completions` body -> ParsedRequest (raises BadRequest)."""
    fields = _Fields(body)
    model = fields.model()
    prompt = _prompt(fields.required("prompt"))
    fields.at_most_one("n", 1)
    fields.at_most_one("best_of", 1)
    fields.unsupported_unless("echo", (False,), "echo is not supported")
    fields.unsupported_unless("suffix", ("",), "suffix (insertion) is not supported")
    fields.unsupported_unless("logprobs", (), "log probabilities are not supported")
    return _parsed(
        fields,
        CompletionRequest(
            model=model,
            request_id=request_id or new_request_id("cmpl-"),
            prompt=prompt,
            sampling=_sampling(fields, max_tokens_limit),
            user=fields.string("user"),
        ),
    )


class _Fields:
    """Typed reads of a request body's fields; each failure is a BadRequest naming the field."""

    def __init__(self, body: Any):
        if not isinstance(body, dict):
            raise BadRequest(f"the request body must be a JSON object, not {_json_type(body)}")
        self.body = body

    def get(self, name: str) -> Any:
        return self.body.get(name)

    def required(self, name: str) -> Any:
        value = self.body.get(name)
        if value is None:
            raise BadRequest(f"missing required field: {name}", name)
        return value

    def model(self) -> str:
        model = self.required("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("model must be a non-empty string (see GET /v1/models)", "model")
        return model

    def string(self, name: str) -> str | None:
        value = self.body.get(name)
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"{name} must be a string, not {_json_type(value)}", name)
        return value

    def boolean(self, name: str) -> bool | None:
        value = self.body.get(name)
        if value is not None and not isinstance(value, bool):
            raise BadRequest(f"{name} must be true or false, not {_json_type(value)}", name)
        return value

    def integer(self, name: str, low: int | None = None, high: int | None = None) -> int | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not _is_int(value):
            raise BadRequest(f"{name} must be an integer, not {_json_type(value)}", name)
        if low is not None and value < low:
            raise BadRequest(f"{name} must be at least {low}, got {_short(value)}", name)
        if high is not None and value > high:
            raise BadRequest(f"{name} must be at most {high}, got {_short(value)}", name)
        return value

    def number(self, name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, float) and not math.isfinite(value):  # (1e400 parses to inf)
            raise BadRequest(f"{name} must be a finite number, got {value}", name)
        if not _is_number(value):
            raise BadRequest(f"{name} must be a number, not {_json_type(value)}", name)
        if value > high or value < low or (low_open and value == low):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise BadRequest(f"{name} must be in {interval}, got {_short(value)}", name)
        return float(value)

    def at_most_one(self, name: str, allowed: int) -> None:
        value = self.integer(name, low=1)
        if value is not None and value != allowed:
            raise BadRequest(f"{name}={_short(value)} is not supported: only {allowed}", name)

    def unsupported_unless(self, name: str, neutral: tuple[Any, ...], why: str) -> None:
        """Accepts `name` when absent, null, or equal to a value that changes nothing."""
        value = self.body.get(name)
        if value is None:
            return
        for ok in neutral:
            if value == ok and type(value) is type(ok):  # 0 == False in Python, not in JSON
                return
        raise BadRequest(f"{why} ({name}={_short(value)})", name)


def _sampling(fields: _Fields, max_tokens_limit: int) -> SamplingParams:
    for penalty in ("presence_penalty", "frequency_penalty"):
        value = fields.number(penalty, -2.0, 2.0)
        if value:
            raise BadRequest(f"{penalty} is not supported (only 0)", penalty)
    logit_bias = fields.get("logit_bias")
    if logit_bias is not None and not (
        isinstance(logit_bias, dict) and all(_is_number(v) and v == 0 for v in logit_bias.values())
    ):
        raise BadRequest("logit_bias is not supported (only biases of 0)", "logit_bias")

    max_tokens = fields.integer("max_tokens", 1, max_tokens_limit)
    max_completion = fields.integer("max_completion_tokens", 1, max_tokens_limit)
    if max_completion is not None:
        max_tokens = max_completion
    temperature = fields.number("temperature", 0.0, 2.0)
    top_p = fields.number("top_p", 0.0, 1.0, low_open=True)
    top_k = fields.integer("top_k", 0, TOP_K_LIMIT)
    seed = fields.integer("seed", *_SEED_RANGE)
    if temperature is None:
        temperature = OPENAI_DEFAULT_TEMPERATURE
    if seed is None and temperature > 0:
        # fixed here, not by the host: a request replayed on another host after a failure
        # then draws the very continuation the first host would have drawn
        seed = secrets.randbits(62)
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else max_tokens_limit,
        temperature=temperature,
        top_p=top_p if top_p is not None else 1.0,
        top_k=top_k or 0,
        seed=seed,
        stop=_stop(fields.get("stop")),
        ignore_eos=bool(fields.boolean("ignore_eos")),
    )


def _parsed(fields: _Fields, completion: CompletionRequest) -> ParsedRequest:
    stream = bool(fields.boolean("stream"))
    options = fields.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise BadRequest("stream_options is only allowed with stream=true", "stream_options")
        if not isinstance(options, dict):
            raise BadRequest(
                f"stream_options must be an object, not {_json_type(options)}", "stream_options"
            )
        flag = options.get("include_usage")
        if flag is not None and not isinstance(flag, bool):
            raise BadRequest(
                "stream_options.include_usage must be true or false",
                "stream_options.include_usage",
            )
        include_usage = bool(flag)
    return ParsedRequest(completion, stream=stream, include_usage=include_usage)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise BadRequest(
            f"stop must be a string or a list of strings, not {_json_type(value)}", "stop"
        )
    if len(items) > MAX_STOP_SEQUENCES:
        raise BadRequest(
            f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(items)}", "stop"
        )
    for item in items:
        if not isinstance(item, str) or not item:
            raise BadRequest("each stop sequence must be a non-empty string", "stop")
    return tuple(items)


def _messages(value: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list):
        raise BadRequest(f"messages must be a list, not {_json_type(value)}", "messages")
    if not value:
        raise BadRequest("messages must not be empty", "messages")
    return tuple(_message(item, f"messages[{i}]") for i, item in enumerate(value))


def _message(item: Any, where: str) -> ChatMessage:
    if not isinstance(item, dict):
        raise BadRequest(f"{where} must be an object, not {_json_type(item)}", where)
    role = item.get("role")
    if not isinstance(role, str):
        raise BadRequest(f"{where}.role must be a string", f"{where}.role")
    if role not in _ROLES:
        if role in ("tool", "function"):
            raise BadRequest(
                f"{where}.role: {role} messages are not supported (no tool calling)",
                f"{where}.role",
            )
        raise BadRequest(
            f"{where}.role must be one of system, user, assistant, not {_short(role)}",
            f"{where}.role",
        )
    for name in ("tool_calls", "function_call"):
        if item.get(name):
            raise BadRequest(f"{where}.{name}: tool calls are not supported", f"{where}.{name}")
    content = item.get("content")
    if content is None:
        raise BadRequest(f"{where}.content is missing", f"{where}.content")
    if isinstance(content, str):
        return ChatMessage(_ROLES[role], content)
    if not isinstance(content, list):
        raise BadRequest(
            f"{where}.content must be a string or a list of text parts, not {_json_type(content)}",
            f"{where}.content",
        )
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise BadRequest(f"{at} must be an object, not {_json_type(part)}", at)
        kind = part.get("type")
        if kind != "text":
            raise BadRequest(
                f"{at}.type: only text content is supported, not {_short(kind)}", f"{at}.type"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise BadRequest(f"{at}.text must be a string", f"{at}.text")
        texts.append(text)
    return ChatMessage(_ROLES[role], "\n".join(texts))


def _prompt(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], str):
            return value[0]
        if (value and all(_is_int(t) for t in value)) or any(isinstance(t, list) for t in value):
            raise BadRequest("token-id prompts are not supported: send text", "prompt")
        if len(value) != 1:
            raise BadRequest(f"give exactly one prompt per request, got {len(value)}", "prompt")
    raise BadRequest(
        f"prompt must be a string or a list of one string, not {_json_type(value)}", "prompt"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):  # ValueError: an int of 4300+ digits
        text = f"<{_json_type(value)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- responses --------------------------------------------------------------------------------


def usage_object(delta: Delta | None) -> dict[str, int] | None:
    """OpenAI's `usage` from the last delta's counts (None when the backend gave none)."""
    if delta is None or delta.prompt_tokens is None or delta.completion_tokens is None:
        return None
    return {
        "prompt_tokens": delta.prompt_tokens,
        "completion_tokens": delta.completion_tokens,
        "total_tokens": delta.prompt_tokens + delta.completion_tokens,
    }


def model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "mesh-node"}


def model_list(model_ids: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(m, created) for m in model_ids]}


def sse_event(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>\\n\\n` (a str payload is sent as is: `[DONE]`)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return b"data: " + data.encode() + b"\n\n"


SSE_DONE = sse_event("[DONE]")


class ResponseFormat:
    """The response objects of one request (one id, one `created` time)."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, response_id: str, model: str, created: int, include_usage: bool = False):
        self.response_id = response_id
        self.model = model
        self.created = created
        self.include_usage = include_usage

    def whole(self, text: str, finish_reason: str, usage: dict[str, int] | None) -> dict:
        return {
            "id": self.response_id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": [self._choice(text, finish_reason)],
            "usage": usage,
        }

    def opening_chunks(self) -> list[dict]:
        return []

    def text_chunk(self, text: str) -> dict:
        raise NotImplementedError

    def finish_chunk(self, finish_reason: str) -> dict:
        raise NotImplementedError

    def usage_chunk(self, usage: dict[str, int] | None) -> dict:
        """The last chunk when stream_options.include_usage is set: no choices, the usage."""
        return self._chunk([]) | {"usage": usage}

    def _choice(self, text: str, finish_reason: str) -> dict:
        raise NotImplementedError

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {
            "id": self.response_id,
            "object": self.chunk_object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: null on every chunk but the usage chunk
        return chunk


class ChatFormat(ResponseFormat):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _choice(self, text: str, finish_reason: str) -> dict:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }

    def _delta(self, delta: dict, finish_reason: str | None = None) -> dict:
        return self._chunk(
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )

    def opening_chunks(self) -> list[dict]:
        return [self._delta({"role": "assistant", "content": ""})]

    def text_chunk(self, text: str) -> dict:
        return self._delta({"content": text})

    def finish_chunk(self, finish_reason: str) -> dict:
        return self._delta({}, finish_reason)


class CompletionFormat(ResponseFormat):
    object_name = "text_completion"
    chunk_object_name = "text_completion"  # OpenAI names chunks like the whole object

    def _choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def text_chunk(self, text: str) -> dict:
        return self._chunk([self._choice(text, None)])

    def finish_chunk(self, finish_reason: str) -> dict:
        return self._chunk([self._choice("", finish_reason)])
