"""Waiting in tests for a condition to hold, bounded (instead of sleeping a guessed time)."""

from __future__ import annotations

import asyncio


async def until(condition, timeout: float = 5.0, what: str = "condition") -> None:
    """Wait (bounded) until `condition()` is true."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{what} not reached within {timeout}s")
