"""English for the counts in messages people read: "1 token", "3 tokens"."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and the noun, singular for exactly one: counted(1, "token") == "1 token"."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
