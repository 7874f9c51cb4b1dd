"""The official `openai` client against a node's API, answered by the built-in model."""

from __future__ import annotations

import openai
import pytest

from tests.serving.conftest import MODEL

SKILLS = [
    ("What is 348 + 276?", "624"),
    ("Reverse the words: apple river cold", "cold river apple"),
    ("Sort the letters: d a c b", "a b c d"),
    ("Count the letter a in: a b a c", "2"),
]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def raw_prompt(text: str) -> str:
    """The built-in chat template, written out: what /v1/completions takes as a prompt."""
    return f"<|user|>\n{text}<|end|>\n<|assistant|>\n"


async def test_models(client):
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "mesh-node"
    assert models.data[0].object == "model"
    model = await client.models.retrieve(MODEL)
    assert model.id == MODEL
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("no-such-model")
    assert caught.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(("prompt", "answer"), SKILLS)
async def test_chat_answers(client, prompt, answer):
    reply = await client.chat.completions.create(model=MODEL, messages=user(prompt), temperature=0)
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == MODEL
    [choice] = reply.choices
    assert (choice.index, choice.message.role, choice.finish_reason) == (0, "assistant", "stop")
    assert choice.message.content == answer
    usage = reply.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_chat_stream_matches_whole_answer(client):
    prompt, answer = SKILLS[1]
    whole = await client.chat.completions.create(model=MODEL, messages=user(prompt), temperature=0)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=user(prompt),
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == answer
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop" and not any(finish[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


async def test_chat_stream_without_usage(client):
    stream = await client.chat.completions.create(
        model=MODEL, messages=user(SKILLS[0][0]), temperature=0, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == SKILLS[0][1]


async def test_completions(client):
    reply = await client.completions.create(
        model=MODEL, prompt=raw_prompt("What is 348 + 276?"), temperature=0
    )
    assert reply.object == "text_completion"
    assert reply.id.startswith("cmpl-")
    [choice] = reply.choices
    assert (choice.text, choice.finish_reason, choice.index) == ("624", "stop", 0)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    # a list of exactly one prompt is the same request
    listed = await client.completions.create(
        model=MODEL, prompt=[raw_prompt("What is 348 + 276?")], temperature=0
    )
    assert listed.choices[0].text == "624"
    assert listed.usage == reply.usage


async def test_completions_stream(client):
    prompt = raw_prompt("Sort the letters: d a c b")
    stream = await client.completions.create(
        model=MODEL,
        prompt=prompt,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "a b c d"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


async def test_sampling_fields(client):
    prompt = "Reverse the words: apple river cold"
    # max_tokens bounds the answer
    short = await client.chat.completions.create(
        model=MODEL, messages=user(prompt), temperature=0, max_tokens=1
    )
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 1
    newer = await client.chat.completions.create(
        model=MODEL, messages=user(prompt), temperature=0, max_completion_tokens=1
    )
    assert newer.choices[0].message.content == short.choices[0].message.content
    # a stop string ends the answer before it
    stopped = await client.chat.completions.create(
        model=MODEL, messages=user(prompt), temperature=0, stop=[" river"]
    )
    assert stopped.choices[0].message.content == "cold"
    assert stopped.choices[0].finish_reason == "stop"
    # seeded sampling is repeatable; top_k (our extension) rides in extra_body
    seeded = [
        await client.chat.completions.create(
            model=MODEL,
            messages=user("Reverse the words: sun moon star tree"),
            temperature=1.5,
            top_p=0.9,
            seed=1234,
            max_tokens=12,
            extra_body={"top_k": 20},
        )
        for _ in range(2)
    ]
    assert seeded[0].choices[0].message.content == seeded[1].choices[0].message.content


async def test_neutral_fields_and_content_parts_are_accepted(client):
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is 348 + 276?"}]}],
        temperature=0,
        n=1,
        presence_penalty=0,
        frequency_penalty=0.0,
        logprobs=False,
        response_format={"type": "text"},
        tools=[],
        tool_choice="none",
        user="someone",
        extra_body={"no_such_field": {"anything": 1}},
    )
    assert reply.choices[0].message.content == "624"
