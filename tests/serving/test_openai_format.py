"""The request parser and the response objects, without a server."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_node.serving.openai_format import (
    ChatFormat,
    CompletionFormat,
    ParsedRequest,
    decode_body,
    parse_chat_completion,
    parse_completion,
    sse_event,
    usage_object,
)
from mesh_node.serving.requests import BadRequest, ChatMessage, CompletionRequest, Delta


def test_chat_request_fields():
    parsed = parse_chat_completion(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
                    "name": "ignored",
                },
            ],
            "max_tokens": 50,
            "max_completion_tokens": 20,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 40,
            "seed": -3,
            "stop": "\n",
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "u1",
            "some_future_field": [1, 2],
        },
        request_id="chatcmpl-x",
    )
    assert parsed.stream and parsed.include_usage
    request = parsed.completion
    assert request.request_id == "chatcmpl-x"
    assert request.messages == (ChatMessage("system", "Be brief."), ChatMessage("user", "one\ntwo"))
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k) == (
        20,
        0.5,
        0.9,
        40,
    )
    assert (sampling.seed, sampling.stop, request.user) == (-3, ("\n",), "u1")


def test_defaults_follow_openai():
    first = parse_chat_completion({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    second = parse_chat_completion({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert not first.stream and not first.include_usage
    sampling = first.completion.sampling
    assert sampling.temperature == 1.0 and sampling.top_p == 1.0 and sampling.top_k == 0
    assert sampling.max_tokens == 32768  # the cap: the context length ends it first
    # a sampled request gets its seed here, so a replay on another host draws the same
    assert sampling.seed is not None and sampling.seed != second.completion.sampling.seed
    assert first.completion.request_id.startswith("chatcmpl-")
    assert first.completion.request_id != second.completion.request_id
    greedy = parse_chat_completion(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    )
    assert greedy.completion.sampling.seed is None


def test_completion_request():
    parsed = parse_completion(
        {"model": "m", "prompt": ["once upon"], "echo": False, "best_of": 1, "suffix": None}
    )
    assert parsed.completion.prompt == "once upon" and parsed.completion.messages is None
    assert parsed.completion.request_id.startswith("cmpl-")


def test_response_objects():
    last = Delta("", finish_reason="stop", prompt_tokens=5, completion_tokens=2)
    usage = usage_object(last)
    assert usage == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert usage_object(Delta("x")) is None
    chat = ChatFormat("chatcmpl-1", "m", 123, include_usage=True)
    whole = chat.whole("hello", "stop", usage)
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert chat.text_chunk("he")["usage"] is None
    assert chat.usage_chunk(usage)["choices"] == []
    text = CompletionFormat("cmpl-1", "m", 123)
    assert text.whole("hi", "length", None)["choices"][0]["text"] == "hi"
    assert "usage" not in text.text_chunk("h")
    assert text.finish_chunk("stop")["choices"][0] == {
        "index": 0,
        "text": "",
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert sse_event({"a": "x\ny"}) == b'data: {"a":"x\\ny"}\n\n'


# -- property: any body gives a request or a BadRequest -----------------------------------

FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "top_k", "seed", "stop", "stream", "stream_options", "user", "n",
    "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "logit_bias", "tools",
    "tool_choice", "functions", "function_call", "response_format", "modalities", "audio",
    "echo", "suffix", "best_of",
]  # fmt: skip

KEYS = st.sampled_from(["role", "content", "type", "text", "include_usage"])
ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(["m", "user", "system", "assistant", "tool", "text", "image_url", ""])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
parts = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]) | json_values},
        optional={"text": st.text(max_size=8) | json_values},
    ),
    max_size=3,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": ROLES | json_values},
        optional={"content": st.text(max_size=8) | parts | json_values, "tool_calls": json_values},
    )
    | json_values,
    max_size=3,
)
# plausible values per field (valid or just outside), so that many bodies get far in the parser
PLAUSIBLE = {
    "max_tokens": st.integers(-2, 1100),
    "max_completion_tokens": st.integers(-2, 1100),
    "temperature": st.floats(-0.5, 2.5),
    "top_p": st.floats(-0.1, 1.1),
    "top_k": st.integers(-1, 50),
    "seed": st.integers(-(2**64), 2**64),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "user": st.text(max_size=5),
    "n": st.integers(0, 2),
    "presence_penalty": st.sampled_from([0, 0.0, 0.5]),
    "frequency_penalty": st.sampled_from([0, 0.0, -1]),
    "logprobs": st.booleans(),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
    "tools": st.sampled_from([[], [{"type": "function"}]]),
    "tool_choice": st.sampled_from(["none", "auto", "required"]),
    "echo": st.booleans(),
    "best_of": st.integers(0, 2),
}


def mostly(likely: st.SearchStrategy, rarely: st.SearchStrategy) -> st.SearchStrategy:
    """`likely` three times in four (one_of would merge repeated strategies)."""
    return st.integers(0, 3).flatmap(lambda i: likely if i else rarely)


def field(name: str) -> st.SearchStrategy:
    return mostly(st.none() | PLAUSIBLE.get(name, st.none()), json_values)


near_valid = st.fixed_dictionaries(
    {
        "model": mostly(st.just("m"), json_values),
        "messages": mostly(st.just([{"role": "user", "content": "hi"}]), messages),
        "prompt": mostly(st.just("hi"), st.lists(st.text(max_size=4), max_size=2) | json_values),
    },
    optional={
        **{name: field(name) for name in FIELDS[3:]},
    },
)
bodies = mostly(near_valid, st.dictionaries(st.sampled_from(FIELDS), json_values) | json_values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_any_body_parses_or_is_a_bad_request(body):
    for parse in (parse_chat_completion, parse_completion):
        try:
            parsed = parse(body, request_id="r", max_tokens_limit=1000)
        except BadRequest as exc:
            assert exc.status == 400 and exc.message
            json.dumps(exc.body())  # the error itself always serializes
        else:
            assert isinstance(parsed, ParsedRequest)
            assert isinstance(parsed.completion, CompletionRequest)
            assert 1 <= parsed.completion.sampling.max_tokens <= 1000


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64) | bodies.map(lambda b: json.dumps(b).encode()))
def test_any_bytes_decode_or_are_a_bad_request(raw):
    try:
        body = decode_body(raw)
    except BadRequest:
        return
    assert isinstance(body, dict)


def test_ignore_eos_extension_is_a_boolean_passed_to_sampling():
    body = {"model": "m", "prompt": "x", "ignore_eos": True}
    assert parse_completion(body).completion.sampling.ignore_eos is True
    assert parse_completion({"model": "m", "prompt": "x"}).completion.sampling.ignore_eos is False
    try:
        parse_completion({**body, "ignore_eos": "yes"})
    except BadRequest as exc:
        assert exc.param == "ignore_eos"
    else:
        raise AssertionError("a non-boolean ignore_eos must be refused")


def test_text_with_a_lone_surrogate_is_a_bad_request():
    for raw in (
        b'{"model": "m", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
        b'{"model": "m", "prompt": "x", "user": "\\udc80"}',
    ):
        try:
            decode_body(raw)
        except BadRequest as exc:
            assert "lone surrogate" in exc.message
        else:
            raise AssertionError(f"accepted {raw!r}")
    assert decode_body(b'{"content": "\\ud83d\\ude00"}') == {"content": "\U0001f600"}  # a pair


def test_top_k_is_bounded():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for top_k in (2**64, 10**30, -1):
        try:
            parse_chat_completion({**body, "top_k": top_k}, request_id="r", max_tokens_limit=10)
        except BadRequest as exc:
            assert exc.param == "top_k"
        else:
            raise AssertionError(f"top_k={top_k} accepted")
    parsed = parse_chat_completion({**body, "top_k": 40}, request_id="r", max_tokens_limit=10)
    assert parsed.completion.sampling.top_k == 40
