"""Stopping background tasks: cancel them, wait for them (bounded), and report what they hid.

`with suppress(CancelledError, Exception): await task` would also swallow a cancel aimed at
the task doing the stopping (a timeout put around `stop()` then never fires) and hide a task
that had died of a bug. `cancel_and_wait` does neither.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger("mesh_node")


async def cancel_and_wait(tasks: Iterable[asyncio.Future], timeout: float = 10.0) -> None:
    """Cancels `tasks` and waits up to `timeout` seconds for them to end. A task that had
    failed is logged; one still running after `timeout` is named in a warning. A cancel of
    the caller propagates as usual."""
    pending = {t for t in tasks if t is not None}
    for task in pending:
        task.cancel()
    if not pending:
        return
    done, still = await asyncio.wait(pending, timeout=timeout)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %r had failed", _name(task), exc_info=task.exception())
    for task in still:
        log.warning("background task %r did not stop within %.0f s", _name(task), timeout)


def _name(task: asyncio.Future) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)
