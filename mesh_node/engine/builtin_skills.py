"""The skills the built-in tiny model is trained on, and the split between training and held-out
prompts.

The built-in checkpoint (``mesh_node/engine/builtin/``) is trained by ``scripts/train_tiny_moe.py``
on a synthetic chat corpus drawn from these generators and evaluated by ``scripts/eval_tiny_moe.py``
on prompts the training never saw. Each skill is a pure function of a ``random.Random``: a prompt
and its one exact answer. Whether a prompt is held out is a pure function of its text (a stable
hash), so the training script, the eval script and the tests agree on the split without sharing any
state.

The skills are chosen so that experts have something different to specialize on: digit arithmetic
with carries, reordering word tokens, ordering letters, and counting.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

# Short common words; each becomes one token of the built-in tokenizer.
_WORD_LIST = (
    "apple river cold stone green house light dog cat sun moon star tree bird fish blue red "
    "road rain snow wind fire water paper book door window table chair glass bread milk salt "
    "ship boat car train plane horse cow sheep goat lion bear wolf fox mouse king queen child "
    "friend music song dance game ball hand foot head eye ear nose mouth heart mind dream "
    "night day morning evening summer winter spring autumn gold silver iron wood sand sea "
    "hill field garden flower grass leaf root seed farm city town street bridge tower wall "
    "black white brown small big fast slow warm soft hard happy quiet loud"
)
WORDS = tuple(_WORD_LIST.split())

HELD_OUT_MODULUS = 8  # one prompt in eight (by hash) is reserved for evaluation


@dataclass(frozen=True)
class Example:
    skill: str
    prompt: str
    answer: str


def _addition(rng: random.Random) -> tuple[str, str]:
    a = rng.randrange(10 ** rng.randint(1, 3))
    b = rng.randrange(10 ** rng.randint(1, 3))
    return f"What is {a} + {b}?", str(a + b)


def _reverse_words(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def _sort_letters(rng: random.Random) -> tuple[str, str]:
    letters = rng.sample(string.ascii_lowercase, rng.randint(3, 8))
    return f"Sort the letters: {' '.join(letters)}", " ".join(sorted(letters))


def _count_letter(rng: random.Random) -> tuple[str, str]:
    alphabet = "abcde"
    target = rng.choice(alphabet)
    letters = [rng.choice(alphabet) for _ in range(rng.randint(3, 10))]
    count = letters.count(target)
    return f"Count the letter {target} in: {' '.join(letters)}", str(count)


SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "addition": _addition,
    "reverse_words": _reverse_words,
    "sort_letters": _sort_letters,
    "count_letter": _count_letter,
}


def is_held_out(prompt: str) -> bool:
    """True for prompts reserved for evaluation; training never uses them."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return digest[0] % HELD_OUT_MODULUS == 0


def sample(skill: str, rng: random.Random, *, held_out: bool) -> Example:
    """Draws one example of `skill` from the training split or from the held-out split."""
    generate = SKILLS[skill]
    while True:
        prompt, answer = generate(rng)
        if is_held_out(prompt) == held_out:
            return Example(skill, prompt, answer)


def held_out_set(per_skill: int, seed: int = 1234) -> list[Example]:
    """`per_skill` distinct held-out examples of every skill, deterministic for a seed."""
    rng = random.Random(seed)
    examples: list[Example] = []
    for skill in SKILLS:
        seen: set[str] = set()
        while len(seen) < per_skill:
            example = sample(skill, rng, held_out=True)
            if example.prompt not in seen:
                seen.add(example.prompt)
                examples.append(example)
    return examples
