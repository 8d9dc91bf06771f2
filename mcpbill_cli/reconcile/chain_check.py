"""The audit hash chain: the window's segment re-hashed (in parallel slices), or the whole
chain from genesis with ``audit.verify_chain``.

A segment is every event from the lowest to the highest ``seq`` whose ``at`` falls in the
window. Its first event must link to the last event before it (whose own hash is taken as
written: ``--chain full``, or the anchor a previous reconcile printed, vouches for the past).
Every event's hash is recomputed with ``audit.event_hash``, so an edited, inserted or deleted
event in the window is found. ``audit_head`` is checked against the last event every time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from sqlalchemy import Connection, Engine, func, select

from mcpbill_cli.ledger import audit
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import audit_head, events
from mcpbill_cli.reconcile import chain_sql
from mcpbill_cli.reconcile.collect import Findings
from mcpbill_cli.reconcile.model import Row, Window
from mcpbill_cli.reconcile.parallel import SliceResult, engine_url, start_slices, worker_engine

e = events.c
BATCH = 5000
PARALLEL_FROM = 50_000  # events: fewer are faster re-hashed here than by spawned workers
NAME = "audit_chain_broken"


@dataclass(frozen=True)
class Segment:
    url: str
    first: int
    last: int
    max_rows: int


def window_seqs(conn: Connection, window: Window) -> tuple[int, int] | None:
    """The lowest and highest ``seq`` of the events in the window (None: no event)."""
    low, high = conn.execute(select(func.min(e.seq), func.max(e.seq)).where(
        e.at >= window.start, e.at < window.end)).one()
    return None if low is None else (int(low), int(high))


def start_window_chain(engine: Engine, conn: Connection, window: Window, jobs: int,
                       found: Findings) -> Callable[[], tuple[int, str] | None]:
    """Start re-hashing the window's segment (workers read on their own connections while the
    caller goes on); call the result to collect what they found and the anchor ``(seq, hash)``
    of the segment's last event."""
    check_head(conn, found)
    span = window_seqs(conn, window)
    if span is None:
        return lambda: None
    first, last = span
    parts = max(1, jobs) if last - first + 1 >= PARALLEL_FROM else 1
    in_server = conn.dialect.name == "postgresql"  # chain_sql: the server hashes, not us
    url = engine_url(engine)
    slices = [Segment(url, lo, hi, found.max_rows) for lo, hi in _split(first, last, parts)]
    work = (partial(_verify_slice, conn) if parts == 1
            else partial(_verify_in_thread, engine) if in_server else _verify_in_worker)
    results = start_slices(work, slices, jobs, threads=in_server)

    def finish() -> tuple[int, str]:
        for result in results():
            _merge(result, found)
        anchor = conn.execute(select(e.hash).where(e.seq == last)).scalar_one()
        return last, str(anchor)

    return finish


def check_full_chain(conn: Connection, found: Findings) -> None:
    """Walk the whole chain from genesis (one process, streaming)."""
    for chain_break in audit.verify_chain(conn, batch=BATCH):
        found.add(NAME, Row("events", str(chain_break.seq), chain_break.problem))


def check_head(conn: Connection, found: Findings) -> None:
    """``audit_head`` must name the last event and its hash (events deleted from the end)."""
    head = conn.execute(select(audit_head.c.seq, audit_head.c.hash)).one()
    highest = conn.execute(select(func.max(e.seq))).scalar_one() or 0
    written = conn.execute(select(e.hash).where(e.seq == head.seq)).scalar_one_or_none()
    if highest != head.seq or (head.seq and written != head.hash):
        found.add(NAME, Row("events", str(head.seq), "the chain's end does not match "
                                                     "audit_head (events deleted from the end, "
                                                     "or the head was edited)"))


def _split(first: int, last: int, parts: int) -> Iterator[tuple[int, int]]:
    size = (last - first + parts) // parts
    for lo in range(first, last + 1, size):
        yield lo, min(lo + size - 1, last)


def _verify_in_worker(segment: Segment) -> SliceResult:
    with reading(worker_engine(segment.url)) as conn:
        return _verify_slice(conn, segment)


def _verify_in_thread(engine: Engine, segment: Segment) -> SliceResult:
    with reading(engine) as conn:
        conn.exec_driver_sql("SET LOCAL jit = off")
        return _verify_slice(conn, segment)


def _verify_slice(conn: Connection, segment: Segment) -> SliceResult:
    result = SliceResult()
    for chain_break in verify_segment(conn, segment.first, segment.last):
        result.add(NAME, Row("events", str(chain_break.seq), chain_break.problem),
                   segment.max_rows)
    return result


def verify_segment(conn: Connection, first: int, last: int) -> Iterator[audit.ChainBreak]:
    """Like ``audit.verify_chain`` but for ``seq`` in ``[first, last]``, linked to the last
    event before ``first``; on PostgreSQL, the server re-hashes (``chain_sql``)."""
    before = conn.execute(select(e.seq, e.hash).where(e.seq < first).order_by(e.seq.desc())
                          .limit(1)).one_or_none()
    expected = (before.seq + 1, before.hash) if before else (1, audit.GENESIS)
    if conn.dialect.name == "postgresql":
        yield from chain_sql.verify_segment(conn, first, last, expected)
    else:
        yield from audit.verify_events(conn, first, last, expected, batch=BATCH)


def _merge(result: SliceResult, found: Findings) -> None:
    for name, count in result.counts.items():
        found.note(name, count)
        for row in result.rows[name]:
            found.show(name, row)
