"""CPU-bound checks (hashing the sealed audit batches, verifying receipt signatures) split into
slices that worker processes read from the database themselves: nothing big crosses a pipe.

Workers are spawned, not forked: a forked child would share the parent's database
connections. Each worker opens one engine of its own and keeps it for its slices. Slices
whose work the database server does (PostgreSQL hashing the batches) run in threads, each
on a connection of its own: the server works them in parallel, nothing is spawned.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy import Engine

from mcpbill_cli.reconcile.model import Row

S = TypeVar("S")
SLICES_PER_JOB = 4

_ENGINES: dict[str, Engine] = {}


@dataclass
class SliceResult:
    """What one slice found: counts per finding name and up to ``max_rows`` rows each."""

    counts: dict[str, int] = field(default_factory=dict)
    rows: dict[str, list[Row]] = field(default_factory=dict)
    checked: int = 0

    def add(self, name: str, row: Row, max_rows: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        listed = self.rows.setdefault(name, [])
        if len(listed) < max_rows:
            listed.append(row)


def worker_engine(url: str) -> Engine:
    """This process's engine for ``url`` (one per worker, reused across its slices)."""
    from mcpbill_cli.ledger.engine import make_engine

    if url not in _ENGINES:
        _ENGINES[url] = make_engine(url, pool_size=1)
    return _ENGINES[url]


def engine_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def run_slices(work: Callable[[S], SliceResult], slices: Sequence[S],
               jobs: int) -> Iterator[SliceResult]:
    """``work`` over every slice: in this process for one job, else in ``jobs`` processes."""
    yield from start_slices(work, slices, jobs)()


def start_slices(work: Callable[[S], SliceResult], slices: Sequence[S], jobs: int, *,
                 threads: bool = False, beside: bool = False
                 ) -> Callable[[], Iterator[SliceResult]]:
    """Like :func:`run_slices`, but the workers start now, while the caller goes on; call
    the result for their results, in slice order. (One job: the work waits for the call,
    unless ``beside``: then one worker does it all while the caller goes on.)"""
    if jobs < 1 or not slices or (jobs == 1 and not beside) or (len(slices) == 1
                                                               and not beside):
        return lambda: map(work, slices)
    workers = min(jobs, len(slices))
    pool: Executor = (ThreadPoolExecutor(workers) if threads else ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn")))
    futures = [pool.submit(work, part) for part in slices]
    pool.shutdown(wait=False)
    return lambda: (future.result() for future in futures)
