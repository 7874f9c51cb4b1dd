"""The checkpoint's tokenizer and chat template (through transformers), and streaming
detokenization.

`TextStream` turns generated token ids into text deltas: a delta never ends inside a multi-byte
character (text that decodes to U+FFFD is held back until the next token completes it), text that
could be the beginning of a stop string is held back until it is known not to be one, and a stop
string ends the stream with the text before it. Its state is a pure function of the tokens fed in,
so a replayed request (prompt + tokens already generated elsewhere) rebuilds exactly the state the
first host had, and its next delta continues the text without duplicating or splitting a character.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mesh_node.engine.errors import CheckpointError

REPLACEMENT_CHAR = "\ufffd"
DETOKENIZE_CONTEXT = 6  # prompt tokens decoded with the first generated ones (leading spaces)
# a message's place in a chat rendered to find where each content went (private-use characters:
# no template makes them, and a content holding them is quoted like any other)
_QUOTE_OPEN, _QUOTE_CLOSE = "\U000f4d00", "\U000f4d01"
_QUOTED = re.compile(f"{_QUOTE_OPEN}([0-9]+){_QUOTE_CLOSE}")


class Tokenizer:
    """A model folder's tokenizer: encoding, chat templates, decoding, end-of-sequence ids."""

    def __init__(self, folder: str | Path, extra_eos_ids: Iterable[int] = ()):
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        try:
            self.hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # transformers raises many types here
            raise CheckpointError(f"cannot load the tokenizer in {folder}: {exc}") from exc
        self._backend = getattr(self.hf, "backend_tokenizer", None)
        eos = set(extra_eos_ids)
        if self.hf.eos_token_id is not None:
            eos.add(int(self.hf.eos_token_id))
        eos.update(_generation_config_eos(self.folder))
        self.eos_token_ids = frozenset(eos)
        self._special_texts = [
            token.content
            for token in getattr(self.hf, "added_tokens_decoder", {}).values()
            if token.special and token.content
        ]

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        """Renders messages with the checkpoint's chat template and encodes the result."""
        if not self.has_chat_template:
            raise CheckpointError(
                f"the tokenizer in {self.folder} has no chat template; send a raw prompt instead"
            )
        text = self._render(messages, add_generation_prompt, template_kwargs)
        contents = [m.get("content") for m in messages]
        if not any(isinstance(c, str) and self._holds_special(c) for c in contents):
            return self.encode(text, add_special_tokens=False)
        return self._encode_contents_as_text(messages, add_generation_prompt, template_kwargs)

    def _render(self, messages, add_generation_prompt: bool, template_kwargs) -> str:
        return self.hf.apply_chat_template(
            list(messages),
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **template_kwargs,
        )

    def _holds_special(self, text: str) -> bool:
        return any(special in text for special in self._special_texts)

    def _encode_contents_as_text(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool, template_kwargs
    ) -> list[int]:
        """The chat's tokens with the special tokens' text inside message contents encoded as
        the plain text it is: a user who writes "<|im_end|>" must not end their turn and
        speak as another role. Each content is rendered as a placeholder, the template's text
        is encoded as usual and every content as text alone (so tokens may differ from a
        whole-text encoding at a content's two ends, only for such messages)."""
        placeholders = [f"{_QUOTE_OPEN}{i}{_QUOTE_CLOSE}" for i in range(len(messages))]
        quoted = [
            {**m, "content": placeholders[i]} if isinstance(m.get("content"), str) else dict(m)
            for i, m in enumerate(messages)
        ]
        text = self._render(quoted, add_generation_prompt, template_kwargs)
        pieces = _QUOTED.split(text)  # template text, a message's index, template text, ...
        indices = [int(i) for i in pieces[1::2]]
        wanted = [i for i, m in enumerate(messages) if isinstance(m.get("content"), str)]
        if sorted(indices) != wanted:
            raise ValueError(  # (the request's problem: a 400 from the generator)
                "a message holds the text of one of the model's special tokens, and this "
                "model's chat template changes or repeats message contents, so the text could "
                "not be kept apart from the template's own special tokens: leave it out"
            )
        ids: list[int] = []
        for n, piece in enumerate(pieces):
            if n % 2 == 0:
                ids += self.encode(piece, add_special_tokens=False) if piece else []
            else:
                content = messages[int(piece)]["content"]
                ids += self.hf.encode(content, add_special_tokens=False, split_special_tokens=True)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(list(ids), skip_special_tokens=True)
        return self.hf.decode(list(ids), skip_special_tokens=True)


def _generation_config_eos(folder: Path) -> set[int]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return set()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return set()  # (transformers ignores an unreadable one too)
    eos = config.get("eos_token_id") if isinstance(config, dict) else None
    if eos is None:
        return set()
    ids = eos if isinstance(eos, list) else [eos]
    if not all(type(e) is int and e >= 0 for e in ids):
        raise CheckpointError(
            f"{path}: eos_token_id must be a token id or a list of them, not {eos!r:.80}"
        )
    return set(ids)


class TextStream:
    """Token ids in, text deltas out; see the module docstring."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
    ):
        self.tokenizer = tokenizer
        context = list(prompt_ids[-DETOKENIZE_CONTEXT:])
        while context and tokenizer.decode(context).startswith(REPLACEMENT_CHAR):
            # the window starts inside a character: a byte-fallback decoder (Llama-2, Mistral,
            # Gemma) decodes a run of byte tokens together, and a run that starts with a
            # continuation byte turns wholly into U+FFFD, generated bytes that join it too
            context.pop(0)
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._stop = tuple(s for s in stop if s)
        self._pending = ""  # decoded text not yet emitted (may be the start of a stop string)
        self.text = ""  # all text emitted so far
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Feeds one generated token; returns the text that can be emitted now (may be "")."""
        if self.stopped:
            return ""
        self._ids.append(int(token_id))
        prefix = self.tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self.tokenizer.decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return ""  # an incomplete character (or nothing visible yet): wait for more tokens
        new_text = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._release(new_text, final=False)

    def finish(self) -> str:
        """At the end of generation: whatever is still held back (an incomplete character too)."""
        if self.stopped:
            return ""
        rest = ""
        if self._read_offset < len(self._ids):
            prefix = self.tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
            full = self.tokenizer.decode(self._ids[self._prefix_offset :])
            rest = full[len(prefix) :]
            self._read_offset = len(self._ids)
        return self._release(rest, final=True)

    def _release(self, new_text: str, final: bool) -> str:
        pending = self._pending + new_text
        if self._stop:
            cut = min((i for i in (pending.find(s) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                self._pending = ""
                self.text += pending[:cut]
                return pending[:cut]
            if not final:
                hold = _longest_stop_prefix_suffix(pending, self._stop)
                if hold:
                    self._pending = pending[-hold:]
                    pending = pending[:-hold]
                else:
                    self._pending = ""
            else:
                self._pending = ""
        self.text += pending
        return pending


def _longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:length]):
                best = length
                break
    return best
