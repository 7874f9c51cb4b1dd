"""Blocking work (model loading, GPU probing) run from asyncio in daemon threads.

Unlike the loop's default executor, a daemon thread never holds up the process's exit: a
node told to stop leaves at once even while a model is still loading. Threads are reused: a
job goes to an idle worker through a queue (starting a thread waits for it to run, which
takes long while other threads hold the GIL: up to 150 ms of a blocked event loop was seen),
and a worker idle for IDLE_SECONDS ends.

Cancelling the awaiting task does not stop the thread: what it makes arrives after nobody
waits for it. `abandoned`, when given, is called with such a result (in a worker thread):
a model loaded for a node that stopped meanwhile is closed, not left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

IDLE_SECONDS = 60.0  # an idle worker ends after this

_jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_lock = threading.Lock()
_idle = 0  # workers waiting for a job (each job handed to one is counted off here)


def _submit(work: Callable[[], None], name: str) -> None:
    global _idle

    def job() -> None:
        threading.current_thread().name = name  # (a reused worker takes the job's name)
        work()

    with _lock:
        if _idle > 0:
            _idle -= 1
            _jobs.put(job)
            return
    threading.Thread(target=_worker, args=(job,), name=name, daemon=True).start()


def _worker(job: Callable[[], None]) -> None:
    global _idle
    while True:
        job()
        with _lock:
            _idle += 1
        while True:
            try:
                job = _jobs.get(timeout=IDLE_SECONDS)
                break
            except queue.Empty:
                with _lock:
                    if _jobs.empty():  # (else a job was handed over just now: take it)
                        _idle -= 1
                        return


async def run_blocking(
    fn: Callable[[], Any],
    name: str = "blocking",
    abandoned: Callable[[Any], None] | None = None,
) -> Any:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    lock = threading.Lock()
    waiting = [True]  # False once the awaiting task is gone (cancelled)

    def give_up(result: Any) -> None:
        if abandoned is not None:
            abandoned(result)

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.done():  # cancelled between the thread's look and this
            if exc is None and abandoned is not None:
                threading.Thread(target=give_up, args=(result,), daemon=True).start()
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, exc = fn(), None
        except BaseException as error:  # handed to the awaiting task
            result, exc = None, error
        with lock:
            handed = waiting[0]
        if handed:
            try:
                loop.call_soon_threadsafe(settle, result, exc)
                return
            except RuntimeError:  # the loop has closed meanwhile (the node stopped)
                pass
        if exc is None:
            give_up(result)

    _submit(work, name)
    try:
        return await future
    except asyncio.CancelledError:
        with lock:
            waiting[0] = False
        if future.done() and not future.cancelled() and future.exception() is None:
            # delivered, then the task was cancelled before it woke: nobody takes it now
            threading.Thread(target=give_up, args=(future.result(),), daemon=True).start()
        raise


def close_quietly(resource: Any) -> None:
    """For `abandoned`: closes what was made for nobody (errors are of no one's concern)."""
    with contextlib.suppress(Exception):
        resource.close()
