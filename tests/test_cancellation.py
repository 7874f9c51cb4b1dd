"""cancel_and_wait: stopping background tasks without swallowing the stopper's own cancel."""

from __future__ import annotations

import asyncio
import logging

import pytest

from mesh_node.cancellation import cancel_and_wait


async def test_tasks_are_cancelled_and_one_that_had_failed_is_logged(caplog):
    async def forever() -> None:
        await asyncio.sleep(3600)

    async def broken() -> None:
        raise RuntimeError("a bug in a loop")

    tasks = [asyncio.ensure_future(forever()), asyncio.ensure_future(broken())]
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="mesh_node"):
        await cancel_and_wait(tasks)
    assert tasks[0].cancelled()
    assert "had failed" in caplog.text and "a bug in a loop" in caplog.text


async def test_a_timeout_around_the_stopper_still_fires():
    """A task slow to end (say, one joining a busy thread) must not hide the cancel of the
    task that stops it: a timeout put around stopping fires."""

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(5)  # winding down
            raise

    task = asyncio.ensure_future(slow_to_stop())
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await cancel_and_wait([task])
    task.cancel()


async def test_a_task_that_will_not_stop_is_named_and_left(caplog):
    release = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await release.wait()  # ignores the cancel until the test lets it go

    task = asyncio.ensure_future(stubborn())
    task.set_name("stubborn-loop")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="mesh_node"):
        await cancel_and_wait([task], timeout=0.1)
    assert "'stubborn-loop' did not stop within" in caplog.text
    release.set()
    await task
