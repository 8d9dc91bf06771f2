"""Blocking work (a ledger transaction) run off the event loop, for less than ``asyncio.to_thread``.

A paid call awaits the ledger twice (its hold, then its capture), each time on a worker thread.
``asyncio.to_thread`` goes through the loop's default executor: a ``concurrent.futures`` future
chained to an asyncio one and a ``queue.Queue`` whose locks and condition are Python code; per
trip that is about twice the CPU of what is done here (worker threads blocked on a
``SimpleQueue``, the result handed back with ``call_soon_threadsafe``), and more latency.

Semantics are ``to_thread``'s: the function runs in a copy of the caller's context (its context
variables), its exception is raised to the caller, and a caller cancelled meanwhile stops
waiting while the function still runs to its end. What it made then is nobody's unless the
caller named who takes it (``abandoned``): a hold taken for a caller that was cancelled (a plain
``task.cancel()``, which no anyio shield holds back) would stay held until it lapsed.
Threads are started as work needs them, up to :data:`MAX_THREADS`, and kept; at interpreter
exit the work already queued is finished first.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import os
import threading
from collections.abc import Callable
from functools import partial
from queue import SimpleQueue
from typing import Any, TypeVar

__all__ = ["MAX_THREADS", "run"]

_T = TypeVar("_T")
MAX_THREADS = min(32, (os.cpu_count() or 1) + 4)  # as the default executor's
_STOP = None  # a worker takes it and ends
# A job: its caller's loop and future, the caller's context, the function, and what takes the
# function's result when the caller stopped waiting for it (see run()).
Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", contextvars.Context,
            Callable[[], Any], Callable[[Any], object] | None]


class _Workers:
    """The worker threads and their queue (one set per process: see :func:`_reset`)."""

    def __init__(self) -> None:
        self.jobs: SimpleQueue[Job | None] = SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.idle = 0  # threads waiting for a job
        self.lock = threading.Lock()  # over idle and threads

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.idle > 0:
                self.idle -= 1  # that thread's: the next job does not count on it
            elif len(self.threads) < MAX_THREADS:
                self._start()
        self.jobs.put(job)

    def stop(self) -> None:
        """End every thread once the jobs queued before are done."""
        with self.lock:
            threads, self.threads = self.threads, []
        for _ in threads:
            self.jobs.put(_STOP)
        for thread in threads:
            thread.join()

    def _start(self) -> None:
        thread = threading.Thread(target=self._work, name=f"mcpbill-offloop-{len(self.threads)}",
                                  daemon=True)
        self.threads.append(thread)
        thread.start()

    def _work(self) -> None:
        while (job := self.jobs.get()) is not _STOP:
            loop, future, context, function, _ = job
            result: Any = None
            error: BaseException | None = None
            try:
                result = context.run(function)
            except BaseException as raised:  # noqa: BLE001 - the caller's to raise
                error = raised
            with self.lock:  # idle before the caller hears: its next job finds this thread
                self.idle += 1
            _answer(job, result, error)


def _answer(job: Job, result: Any, error: BaseException | None) -> None:
    if job[1].cancelled():  # the caller stopped waiting before: settled here, without a trip
        _settle(job, result, error)  # to a loop that may close before it runs the callback
        return
    try:
        job[0].call_soon_threadsafe(_settle, job, result, error)
    except RuntimeError:  # the loop is closed: nobody waits any more
        if job[1].cancelled():  # as asyncio.run() cancels what is left before it closes
            _settle(job, result, error)  # nothing of the loop's: abandoned, on a worker


def _settle(job: Job, result: Any, error: BaseException | None) -> None:
    """On the caller's loop (where its cancellation happens too, so the two cannot cross):
    the caller's answer, or, for a caller that stopped waiting, the result to ``abandoned`` on
    a worker thread."""
    future = job[1]
    if future.cancelled():  # the caller stopped waiting; the work is done all the same
        loop, _, context, _, abandoned = job
        if abandoned is not None and error is None:  # its errors are its own to handle
            _workers.submit((loop, future, context, partial(abandoned, result), None))
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


_workers = _Workers()


def _reset() -> None:
    """A forked child has none of its parent's threads: it starts its own."""
    global _workers
    _workers = _Workers()


async def run(function: Callable[[], _T],
              abandoned: Callable[[_T], object] | None = None) -> _T:
    """``function()`` on a worker thread, awaited (see the module docstring); when the caller
    was cancelled before it returned, its result goes to ``abandoned`` instead, on a worker
    thread, e.g. to undo what nobody will know of."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()
    context = contextvars.copy_context()
    _workers.submit((loop, future, context, function, abandoned))
    try:
        return await future
    except asyncio.CancelledError:
        # Cancelled after the answer came but before this task resumed (the future done, not
        # cancelled, so _settle handed nothing to ``abandoned``): the result is lost here.
        if abandoned is not None and _answered(future):
            _workers.submit((loop, future, context, partial(abandoned, future.result()), None))
        raise


def _answered(future: asyncio.Future[Any]) -> bool:
    """Whether ``future`` holds a result (not cancelled, no exception)."""
    return future.done() and not future.cancelled() and future.exception() is None


atexit.register(lambda: _workers.stop())
os.register_at_fork(after_in_child=_reset)
