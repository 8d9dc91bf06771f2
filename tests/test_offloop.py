"""``mcpbill_cli.offloop``: what the async twins await instead of ``asyncio.to_thread``."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from contextvars import ContextVar
from typing import Any

import pytest

from mcpbill_cli import offloop

SOURCE: ContextVar[str] = ContextVar("source", default="none")


def test_the_function_runs_on_another_thread_with_the_callers_context_variables() -> None:
    async def scenario() -> tuple[str, int]:
        SOURCE.set("10.0.0.7")
        return await offloop.run(lambda: (SOURCE.get(), threading.get_ident()))

    source, thread = asyncio.run(scenario())
    assert source == "10.0.0.7"
    assert thread != threading.get_ident()


def test_an_exception_reaches_the_caller_as_raised() -> None:
    class Refused(Exception):
        pass

    def refuse() -> None:
        raise Refused("no")

    with pytest.raises(Refused, match="no"):
        asyncio.run(offloop.run(refuse))


def test_jobs_run_at_once_side_by_side_not_one_after_another() -> None:
    """Each job waits for all the others to have started: run one at a time, none would end."""
    side_by_side = 4
    barrier = threading.Barrier(side_by_side, timeout=10)

    async def scenario() -> list[int]:
        return await asyncio.gather(*(offloop.run(barrier.wait) for _ in range(side_by_side)))

    assert sorted(asyncio.run(scenario())) == list(range(side_by_side))


def test_a_cancelled_caller_stops_waiting_and_the_job_still_runs_to_its_end() -> None:
    release, ended = threading.Event(), threading.Event()

    def job() -> None:
        release.wait(10)
        ended.set()

    async def scenario() -> None:
        waiting = asyncio.ensure_future(offloop.run(job))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        await asyncio.to_thread(ended.wait, 10)

    asyncio.run(scenario())
    assert ended.is_set()
    assert asyncio.run(offloop.run(lambda: "next")) == "next"  # the thread took the next job


def test_what_a_job_made_for_a_cancelled_caller_goes_to_abandoned() -> None:
    """A caller cancelled while its job runs (a plain task.cancel()) never gets the result:
    ``abandoned`` does, once; a caller that waited gets it itself and ``abandoned`` nothing."""
    release = threading.Event()
    taken: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()

    def job() -> str:
        release.wait(10)
        return "made"

    def abandoned(result: str) -> None:
        taken.put((result, threading.get_ident()))

    async def scenario() -> str:
        waiting = asyncio.ensure_future(offloop.run(job, abandoned))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        return await offloop.run(lambda: "waited for", abandoned)

    assert asyncio.run(scenario()) == "waited for"
    result, thread = taken.get(timeout=10)
    assert result == "made" and thread != threading.get_ident()  # on a worker thread
    time.sleep(0.2)
    assert taken.empty()


def test_a_cancelled_callers_result_reaches_abandoned_when_its_loop_runs_no_more() -> None:
    """The job ends after its caller was cancelled and its loop stopped running (it was
    closing, or its server stopped): ``abandoned`` gets the result all the same (a hold to
    void), not a callback queued on a loop that never runs it."""
    release = threading.Event()
    taken: queue.SimpleQueue[str] = queue.SimpleQueue()

    def job() -> str:
        release.wait(10)
        return "made"

    async def cancelled_caller() -> None:
        waiting = asyncio.ensure_future(offloop.run(job, taken.put))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(cancelled_caller())
        release.set()  # the job ends while nothing runs the loop
        assert taken.get(timeout=10) == "made"
    finally:
        loop.close()


class _AnsweringLoop(asyncio.SelectorEventLoop):
    """An event loop that tells when another thread has queued a callback on it."""

    def __init__(self) -> None:
        super().__init__()
        self.queued = threading.Event()

    def call_soon_threadsafe(self, *args: Any, **kwargs: Any) -> asyncio.Handle:  # type: ignore[override]
        handle = super().call_soon_threadsafe(*args, **kwargs)
        self.queued.set()
        return handle


def test_a_result_answered_as_its_caller_is_cancelled_goes_to_abandoned() -> None:
    """The answer is on the loop (the future done) when the caller is cancelled, before it
    resumed: it never gets the result, so ``abandoned`` does, once."""
    release = threading.Event()
    taken: queue.SimpleQueue[str] = queue.SimpleQueue()
    loop = _AnsweringLoop()

    def job() -> str:
        release.wait(10)
        return "made"

    async def scenario() -> None:
        waiting = asyncio.ensure_future(offloop.run(job, taken.put))
        await asyncio.sleep(0)  # the job is submitted
        release.set()
        assert loop.queued.wait(10)  # the loop blocked until the answer is queued on it
        loop.call_soon(waiting.cancel)  # runs after the answer, before the caller resumes
        with pytest.raises(asyncio.CancelledError):
            await waiting

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert taken.get(timeout=10) == "made"
    time.sleep(0.2)
    assert taken.empty()


def test_what_a_job_made_for_a_caller_cancelled_as_its_loop_closed_goes_to_abandoned() -> None:
    """asyncio.run() cancels the callers still waiting and closes the loop (a server shutting
    down): the answer has no loop to go to, and ``abandoned`` takes it."""
    release = threading.Event()
    taken: queue.SimpleQueue[str] = queue.SimpleQueue()
    callers: list[asyncio.Future[str]] = []

    def job() -> str:
        release.wait(10)
        return "made"

    async def scenario() -> None:
        callers.append(asyncio.ensure_future(offloop.run(job, taken.put)))
        await asyncio.sleep(0)  # the job is submitted; the caller is left waiting

    asyncio.run(scenario())
    assert callers[0].cancelled()
    release.set()
    assert taken.get(timeout=10) == "made"


def test_sequential_jobs_start_no_thread_beyond_the_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread is counted idle before its caller hears back: the caller's next job finds it
    (else every job could start a thread, up to MAX_THREADS). The thread is held just after
    it answers until the caller has handed over its next job, so the race is always lost by
    a thread counted idle too late."""
    workers = offloop._Workers()  # no idle threads left by other tests
    monkeypatch.setattr(offloop, "_workers", workers)
    next_job_in = threading.Event()
    answer = offloop._answer

    def answer_then_wait(*args: Any) -> None:
        answer(*args)
        next_job_in.wait(10)

    monkeypatch.setattr(offloop, "_answer", answer_then_wait)

    async def scenario() -> int:
        await offloop.run(lambda: None)
        following = asyncio.ensure_future(offloop.run(lambda: None))
        await asyncio.sleep(0)  # the next job is submitted
        next_job_in.set()
        await following
        return len(workers.threads)

    try:
        started = asyncio.run(scenario())
    finally:
        workers.stop()
    assert started == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_runs_its_jobs_on_threads_of_its_own() -> None:
    asyncio.run(offloop.run(lambda: None))  # the parent has a worker thread
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's result is its exit status
        ok = False
        try:
            ok = asyncio.run(asyncio.wait_for(offloop.run(lambda: 42), 10)) == 42
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
