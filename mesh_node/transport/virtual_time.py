"""An asyncio event loop whose clock jumps to the next timer instead of sleeping.

Meshes over the in-memory network have no sockets: whenever nothing is ready to run, the
loop would sleep until its next timer. This loop skips the sleep and moves its clock there,
so a simulated minute of gossip runs in the CPU time it needs, deterministically. Code under
test uses `loop.time()`, `asyncio.sleep` and timeouts as usual. (Threads and real sockets are
not for this loop: nothing ever wakes it from outside.)
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any


class _JumpingSelector(selectors.BaseSelector):
    def __init__(self) -> None:
        self.now = 0.0
        self._keys: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise RuntimeError("virtual-time loop is idle with no timer: nothing can happen")
        self.now += max(timeout, 0.0)
        return []

    def get_map(self) -> Any:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        super().__init__(selector=self._jumping)

    def time(self) -> float:
        return self._jumping.now


def run(coro: Any) -> Any:
    """`asyncio.run` on a fresh VirtualTimeLoop."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)
