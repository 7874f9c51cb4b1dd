"""`ScriptedBackend`: a small in-test Backend for the paths the real model cannot produce on
demand (errors before or during a stream, a generation that never ends), which counts the
streams it has open so a test can watch a disconnect cancel one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from mesh_node.serving.requests import (
    CompletionRequest,
    Delta,
    GenerationFailed,
    ModelNotFound,
    NoHostAvailable,
    Overloaded,
)


async def _stall(request: CompletionRequest) -> AsyncIterator[Delta]:
    yield Delta("first ")
    await asyncio.sleep(3600)  # a generation that only a cancellation ends
    yield Delta("never", finish_reason="stop")


async def _stall_before(request: CompletionRequest) -> AsyncIterator[Delta]:
    await asyncio.sleep(3600)
    yield Delta("never", finish_reason="stop")


async def _no_host(request: CompletionRequest) -> AsyncIterator[Delta]:
    raise NoHostAvailable(f"no node serves {request.model} right now")
    yield Delta("")  # an async generator


async def _fail_mid(request: CompletionRequest) -> AsyncIterator[Delta]:
    yield Delta("partial ")
    raise GenerationFailed("the host went away and no other host took over")


async def _crash(request: CompletionRequest) -> AsyncIterator[Delta]:
    raise RuntimeError("secret internal detail")
    yield Delta("")


async def _crash_mid(request: CompletionRequest) -> AsyncIterator[Delta]:
    yield Delta("partial ")
    raise RuntimeError("secret internal detail")


async def _unfinished(request: CompletionRequest) -> AsyncIterator[Delta]:
    yield Delta("partial ")  # and ends without a finish_reason


async def _empty(request: CompletionRequest) -> AsyncIterator[Delta]:
    return
    yield Delta("")


async def _echo(request: CompletionRequest) -> AsyncIterator[Delta]:
    yield Delta("ok", finish_reason="stop", prompt_tokens=3, completion_tokens=1)


async def _flood(request: CompletionRequest) -> AsyncIterator[Delta]:
    for _ in range(4000):  # 16 MB of text, far beyond any socket buffer
        yield Delta("x" * 4096)
    yield Delta("", finish_reason="length", prompt_tokens=1, completion_tokens=4000)


SCRIPTS = {
    "flood": _flood,
    "stall": _stall,
    "stall-before": _stall_before,
    "no-host": _no_host,
    "fail-mid": _fail_mid,
    "crash": _crash,
    "crash-mid": _crash_mid,
    "unfinished": _unfinished,
    "empty": _empty,
    "echo": _echo,
}
OVERLOADED = "overloaded"  # refused when the stream opens, as LocalModels does when full
CRASH_ON_OPEN = "crash-on-open"


class ScriptedBackend:
    def __init__(self) -> None:
        self.active = 0  # streams open now
        self.opened = 0
        self.requests: list[CompletionRequest] = []
        self._changed = asyncio.Event()

    def model_ids(self) -> list[str]:
        return sorted([*SCRIPTS, OVERLOADED, CRASH_ON_OPEN])

    @contextlib.asynccontextmanager
    async def stream(self, request: CompletionRequest) -> AsyncIterator[AsyncIterator[Delta]]:
        self.requests.append(request)
        if request.model == OVERLOADED:
            raise Overloaded("busy: 72 requests are active or queued")
        if request.model == CRASH_ON_OPEN:
            raise RuntimeError("secret internal detail")
        script = SCRIPTS.get(request.model)
        if script is None:
            raise ModelNotFound(f"model {request.model!r} is not served", "model")
        self.active += 1
        self.opened += 1
        self._changed.set()
        try:
            yield script(request)
        finally:
            self.active -= 1
            self._changed.set()

    async def wait_idle(self, timeout: float = 2.0) -> None:
        await self._wait_until(lambda: self.active == 0, timeout)

    async def wait_active(self, timeout: float = 5.0, count: int = 1) -> None:
        """Until `count` requests are under way (at least)."""
        await self._wait_until(lambda: self.active >= count, timeout)

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()
