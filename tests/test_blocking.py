"""run_blocking: work in a daemon thread, awaited; what it makes for nobody is handed on."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mesh_node.blocking import run_blocking


async def test_the_result_and_the_error_reach_the_awaiting_task():
    assert await run_blocking(lambda: 6 * 7) == 42
    with pytest.raises(ZeroDivisionError):
        await run_blocking(lambda: 1 / 0)


async def test_a_result_made_after_its_task_was_cancelled_is_handed_to_abandoned():
    release = threading.Event()
    handed: list[str] = []
    given_up = threading.Event()

    def slow() -> str:
        release.wait(10)
        return "a loaded model"

    def abandoned(result: str) -> None:
        handed.append(result)
        given_up.set()

    task = asyncio.ensure_future(run_blocking(slow, "slow", abandoned))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    assert await asyncio.to_thread(given_up.wait, 10)
    assert handed == ["a loaded model"]


async def test_a_cancel_that_lands_while_the_result_is_on_its_way_hands_it_on_once():
    """The thread has looked (someone waits) and handed its result to the loop, but the task
    is cancelled before the loop delivers it: the result goes to `abandoned`, exactly once."""
    loop = asyncio.get_running_loop()
    handed: list[int] = []
    given_up = threading.Event()
    tasks: list[asyncio.Task] = []

    def work() -> int:
        loop.call_soon_threadsafe(tasks[0].cancel)  # queued ahead of the result
        return 7

    def abandoned(result: int) -> None:
        handed.append(result)
        given_up.set()

    tasks.append(asyncio.ensure_future(run_blocking(work, "quick", abandoned)))
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    assert await asyncio.to_thread(given_up.wait, 10)
    await asyncio.sleep(0.05)
    assert handed == [7]


async def test_an_error_made_for_nobody_is_not_handed_on():
    release = threading.Event()
    handed: list = []

    def failing() -> None:
        release.wait(10)
        raise RuntimeError("nobody hears this")

    task = asyncio.ensure_future(run_blocking(failing, "failing", handed.append))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await asyncio.sleep(0.2)
    assert handed == []


async def test_workers_are_reused_and_take_the_jobs_name():
    names = [await run_blocking(lambda: threading.current_thread().name, "first")]
    before = threading.active_count()
    for n in range(20):  # one after another: one idle worker serves them all
        names.append(await run_blocking(lambda: threading.current_thread().name, f"job-{n}"))
        ident = await run_blocking(threading.get_ident, "ident")
        assert ident != threading.get_ident()
    assert threading.active_count() <= before + 1
    assert names[1:] == [f"job-{n}" for n in range(20)]


async def test_jobs_at_once_each_get_a_worker():
    release = threading.Event()
    started = []

    def wait() -> None:
        started.append(1)
        release.wait(10)

    jobs = [asyncio.ensure_future(run_blocking(wait, "parallel")) for _ in range(5)]
    for _ in range(200):
        if len(started) == 5:
            break
        await asyncio.sleep(0.01)
    assert len(started) == 5  # none waits behind another
    release.set()
    await asyncio.gather(*jobs)


async def test_a_cancel_that_lands_after_the_result_but_before_the_task_wakes_hands_it_on():
    """The result is delivered, then the task is cancelled in the same loop pass, before it
    wakes: asyncio raises CancelledError in it, and the result goes to `abandoned`."""
    handed: list[str] = []
    given_up = threading.Event()
    tasks: list[asyncio.Task] = []
    loop = asyncio.get_running_loop()
    original = loop.call_soon_threadsafe

    def result_then_cancel(callback, *args):  # the delivery, with the cancel right behind it
        def deliver_then_cancel() -> None:
            callback(*args)
            tasks[0].cancel()

        return original(deliver_then_cancel)

    def abandoned(result: str) -> None:
        handed.append(result)
        given_up.set()

    loop.call_soon_threadsafe = result_then_cancel
    try:
        tasks.append(asyncio.ensure_future(run_blocking(lambda: "engine", "quick", abandoned)))
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
    finally:
        loop.call_soon_threadsafe = original
    assert await asyncio.to_thread(given_up.wait, 10)
    assert handed == ["engine"]
