"""Streaming detokenization: no split characters, stop strings, replayable state."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_node.engine.tokenizer import TextStream, Tokenizer

TEXT = "héllo 🤖 wörld — ça va? 你好"


@pytest.fixture(scope="module")
def tokenizer(references):
    folder, _ = references.get("llama")  # byte-level tokenizer: multi-byte characters span tokens
    return Tokenizer(folder)


def feed(stream: TextStream, ids) -> list[str]:
    return [stream.add(t) for t in ids]


def test_deltas_never_split_a_character(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) == len(TEXT.encode("utf-8"))  # one token per byte
    stream = TextStream(tokenizer)
    deltas = [*feed(stream, ids), stream.finish()]
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 5  # bytes of multi-byte characters were held


def test_stop_string_cuts_the_text_and_is_not_emitted(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["wör", "zzz"])
    deltas = []
    for token in ids:
        deltas.append(stream.add(token))
        if stream.stopped:
            break
    assert stream.stopped
    assert "".join(deltas) == "héllo 🤖 "
    assert stream.text == "héllo 🤖 "


def test_partial_stop_string_is_released_when_it_does_not_match(tokenizer):
    ids = tokenizer.encode("a wo wo", add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["wor"])
    deltas = feed(stream, ids)
    assert "".join(deltas) == "a wo "  # the first "wo" proved harmless; the last may become "wor"
    assert stream.finish() == "wo" and not stream.stopped
    assert stream.text == "a wo wo"


def test_replayed_state_continues_the_text_exactly(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    for cut in range(len(ids)):
        first = TextStream(tokenizer)
        emitted = "".join(feed(first, ids[:cut]))
        replay = TextStream(tokenizer)
        feed(replay, ids[:cut])  # silently, as the generator does for generated_ids
        rest = "".join(feed(replay, ids[cut:])) + replay.finish()
        assert emitted + rest == TEXT, cut


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(
        st.characters(exclude_characters="\ufffd", exclude_categories=("Cs",)), max_size=40
    ),
    stop=st.text(min_size=1, max_size=3),
)
def test_any_text_streams_back_whole(tokenizer, text, stop):
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer)
    deltas = [stream.add(t) for t in ids]
    deltas.append(stream.finish())
    assert "".join(deltas) == text
    assert not any(d.endswith("\ufffd") for d in deltas if d)
    # with a stop string: exactly the text before its first occurrence
    stopped = TextStream(tokenizer, stop=[stop])
    emitted = ""
    for t in ids:
        emitted += stopped.add(t)
        if stopped.stopped:
            break
    emitted += stopped.finish()
    cut = text.find(stop)
    assert emitted == (text if cut < 0 else text[:cut])


@pytest.fixture(scope="module")
def byte_fallback_tokenizer(tmp_path_factory):
    """A Llama-2-style tokenizer (Unigram with byte fallback and its decoder) that has no
    token for emoji: they are spelled as <0xNN> byte tokens."""
    from tokenizers import Tokenizer as Fast
    from tokenizers import decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(f"<0x{i:02X}>", 0.0) for i in range(256)]
    vocab += [(piece, -1.0) for piece in ["▁", "▁I", "▁love", "▁hello", "▁too"]]
    fast = Fast(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    fast.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    fast.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    folder = tmp_path_factory.mktemp("byte-fallback")
    PreTrainedTokenizerFast(
        tokenizer_object=fast, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    return Tokenizer(folder)


@pytest.mark.parametrize("cut", range(1, 5))
def test_a_prompt_ending_in_byte_tokens_leaves_the_generated_characters_whole(
    byte_fallback_tokenizer, cut
):
    """The decoding window (the prompt's last tokens) may start inside a character made of
    byte tokens: a byte-fallback decoder then turned the generated characters into U+FFFD."""
    tok = byte_fallback_tokenizer
    text = "I love " + "🦙" * cut + "🦙 too"
    ids, prompt = tok.encode(text), tok.encode("I love " + "🦙" * cut)
    assert ids[: len(prompt)] == prompt  # the generated part is the rest, byte tokens first
    stream = TextStream(tok, prompt)
    generated = "".join(stream.add(i) for i in ids[len(prompt) :]) + stream.finish()
    assert generated == "🦙 too"
