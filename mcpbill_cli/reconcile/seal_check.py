"""The sealed audit trail: the seals of the window (or every seal), their links, signatures
and batches, and the events still waiting for a seal.

A seal covers a batch of events (``ledger.seals``). ``chain="window"`` checks every seal that
holds an event whose ``at`` falls in the window; the first of them must link to the seal
before it, whose own hash is taken as written (``--chain full``, or the anchor a previous
reconcile printed, vouches for the past). ``chain="full"`` checks every seal from the first.

- **Seals**, one by one in number order: numbers without gaps, each linked to the one before,
  its hash over its fields, its JWS by a key of the key ring (any status: a seal is a record
  of the past). Few rows: a seal holds up to 5,000 events.
- **Batches**: the events stamped with each seal, their count, id span and own hashes against
  the seal's batch hash. On PostgreSQL the server hashes them (``seal_sql``), on SQLite Python
  hashes the canonical forms SQLite writes, seal by seal (``seal_py``); ``seals.verify_batch``
  re-checks only the seals they could not vouch for, one seal's events in memory at a time,
  and names the events. On SQLite, a big window's slices are hashed beside the SQL checks:
  with two jobs by a thread of this process (SQLite runs those checks with the GIL released,
  so the thread has a core of its own, and a spawned worker would first spend about 0.6 s of
  CPU importing what it runs: more than the 100k events of a busy day take to hash), with more
  by ``jobs - 1`` worker processes. A ledger in memory is seen by its own connection only: its
  batches are hashed on that one.
- **Money**: per seal, the transfers its events name summed again per class of account
  (``ledger.seal_money``: one grouped join per slice, per seal on SQLite) against the money
  the seal signed, which must sum to zero: the ledger sums to zero at every seal, and no
  transfer changed after it was sealed. Seals written before schema 0008 carry no money and
  are not checked for it.
- **Strays**: seal numbers that events carry and no seal row has (a seal deleted, an event
  stamped by hand).
- **Unsealed**: events older than ``UNSEALED_WINDOW`` that no sealer has taken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

from sqlalchemy import Connection, Engine, exists, func, select

from mcpbill_cli.keys import KeyRing, VerificationKey
from mcpbill_cli.ledger.audit import GENESIS
from mcpbill_cli.ledger.engine import reading, sqlite_file
from mcpbill_cli.ledger.models import events, seals
from mcpbill_cli.ledger.seal_money import Money, money_by_seal
from mcpbill_cli.ledger.seals import (
    UNSEALED_WINDOW,
    Seal,
    read_seals,
    unsealed_before,
    verify_batch,
    verify_seal,
)
from mcpbill_cli.reconcile import seal_py, seal_sql
from mcpbill_cli.reconcile.collect import Findings
from mcpbill_cli.reconcile.model import ChainMode, Row, Window
from mcpbill_cli.reconcile.parallel import SliceResult, engine_url, start_slices, worker_engine
from mcpbill_cli.reconcile.receipt_check import receipt_keys

e = events.c
s = seals.c
NAME = "audit_chain_broken"
UNSEALED = "audit_unsealed"
MONEY = "seal_money_mismatch"
SLICE = 64  # seals a slice checks: ~320k events when they are full
PARALLEL_FROM = 50_000  # events: fewer are faster hashed here than by spawned workers

Keys = Mapping[str, VerificationKey]


@dataclass(frozen=True)
class Scope:
    """The seals to check: numbered ``first`` to ``last`` (``None``: to the end)."""

    first: int
    last: int | None


@dataclass(frozen=True)
class BatchSlice:
    url: str
    first: int
    last: int
    max_rows: int


def seal_keys(keys_dir: Path | None) -> Keys | None:
    """Every key of the key ring, by kid; ``None`` without one (signatures go unchecked)."""
    if keys_dir is None or not KeyRing.exists(keys_dir):
        return None
    return receipt_keys(keys_dir)


def seal_scope(conn: Connection, mode: ChainMode, window: Window) -> Scope | None:
    """Every seal (``full``), or those holding the window's events and the seal on either
    side of them; None: nothing sealed. (``seal + 0``: PostgreSQL would find the min and max
    down ``ix_events_seal`` from either end, reading every event sealed before the window, not
    the window's through ``ix_events_at``.)

    The seals on either side are whole seals of their own, checked like the rest: a seal at
    the window's edge emptied of its events (deleted with their transfers at midnight) holds
    an event of no window, and a seal written after the last one without events (a copy of an
    old one) none either; each day's reconcile would pass them by."""
    if mode == "full":
        return Scope(1, None)
    number = e.seal + 0
    low, high = conn.execute(select(func.min(number), func.max(number)).where(
        e.at >= window.start, e.at < window.end, e.seal.is_not(None))).one()
    return None if low is None else Scope(max(int(low) - 1, 1), int(high) + 1)


def start_seal_check(engine: Engine, conn: Connection, scope: Scope | None, keys: Keys | None,
                     jobs: int, found: Findings, prepare: Callable[[Connection], None]
                     ) -> Callable[[], tuple[int, str] | None]:
    """Start hashing the batches of ``scope`` (workers, or PostgreSQL connections set up by
    ``prepare``, go on while the caller runs its other checks); call the result to check the
    seals themselves, collect what the batches showed, and get the anchor ``(number, hash)``
    of the last seal."""
    if scope is None:
        return lambda: None
    in_server = conn.dialect.name == "postgresql"
    spans, jobs = _slices(conn, scope, jobs)
    parts = [BatchSlice(engine_url(engine), first, last, found.max_rows) for first, last in spans]
    if in_server:
        work = (partial(_check_batches, conn) if jobs <= 1 or len(parts) <= 1
                else partial(_check_in_thread, engine, prepare))
        results = start_slices(work, parts, jobs, threads=True)
    elif jobs <= 1 or sqlite_file(engine_url(engine)) is None:  # in memory: only conn sees it
        results = start_slices(partial(_check_batches, conn), parts, 1)
    elif jobs == 2:  # one job beside the SQL checks: a thread here (see the module's docstring)
        results = start_slices(partial(_check_in_thread, engine, _as_is), parts, 1,
                               threads=True, beside=True)
    else:  # this process runs the SQL checks meanwhile: jobs - 1 workers hash
        results = start_slices(_check_in_worker, parts, jobs - 1, beside=True)

    def finish() -> tuple[int, str] | None:
        anchor = _check_seals(conn, scope, keys, found)
        for result in results():
            _merge(result, found)
        for number in _strays(conn, scope):
            found.add(NAME, Row("seals", str(number), "events carry this seal number but no "
                                                      "seal has it (the seal was deleted, or "
                                                      "the events stamped by hand)"))
        return anchor

    return finish


def check_unsealed(conn: Connection, now: datetime, found: Findings) -> None:
    """Events written more than ``UNSEALED_WINDOW`` seconds before ``now`` and still unsealed:
    no sealer ran, or someone inserted them."""
    count, oldest = unsealed_before(conn, now - timedelta(seconds=UNSEALED_WINDOW))
    if not count:
        return
    found.note(UNSEALED, count, f"{count} audit event(s) written over {UNSEALED_WINDOW} s ago "
                                "are not sealed: run a verifier on this ledger (it seals every "
                                "second) or `mcpbill audit seal`")
    found.show(UNSEALED, Row("events", str(oldest), "the oldest unsealed event"))


# --- the seals themselves, in order -----------------------------------------------------------


def _check_seals(conn: Connection, scope: Scope, keys: Keys | None,
                 found: Findings) -> tuple[int, str] | None:
    """Walk the seals of ``scope`` in order: gaps, links, hashes and signatures."""
    expected, prev_hash = scope.first, _hash_before(conn, scope.first, found)
    anchor = None
    for seal in read_seals(conn, first=scope.first, last=scope.last):
        if seal.number != expected:
            _missing(found, expected, seal.number - 1)
        problems = list(verify_seal(seal, seal.prev_hash if prev_hash is None else prev_hash,
                                    keys))
        if problems:
            found.add(NAME, Row("seals", str(seal.number), "; ".join(problems)))
        expected, prev_hash, anchor = seal.number + 1, seal.hash, (seal.number, seal.hash)
    return anchor


def _hash_before(conn: Connection, first: int, found: Findings) -> str | None:
    """What seal ``first`` must link to: the hash of the seal before, as written (``None``
    when that seal is gone: the finding says so)."""
    if first <= 1:
        return GENESIS
    written = conn.execute(select(s.hash).where(s.number == first - 1)).scalar_one_or_none()
    if written is None:
        _missing(found, first - 1, first - 1)
    return written


def _missing(found: Findings, first: int, last: int) -> None:
    key = str(first) if first == last else f"{first}..{last}"
    found.add(NAME, Row("seals", key, "missing: later seals exist (deleted?)"))


def _strays(conn: Connection, scope: Scope) -> Iterator[int]:
    carried = select(e.seal.label("number")).distinct().where(e.seal.is_not(None))
    if scope.last is not None:
        carried = carried.where(e.seal >= scope.first, e.seal <= scope.last)
    numbers = carried.subquery()
    query = select(numbers.c.number).where(~exists().where(s.number == numbers.c.number))
    for number in conn.execute(query.order_by(numbers.c.number)).scalars():
        yield int(number)


# --- the batches, in slices -------------------------------------------------------------------


def _slices(conn: Connection, scope: Scope, jobs: int) -> tuple[list[tuple[int, int]], int]:
    """(first, last) seal numbers of consecutive runs of ``scope``'s seals, and the jobs to
    hash them: one below PARALLEL_FROM events, else at least one run per job, at most SLICE
    seals each. (On SQLite one job is this process, busy with the SQL checks meanwhile.)"""
    query = select(s.number, s.count).where(s.number >= scope.first).order_by(s.number)
    if scope.last is not None:
        query = query.where(s.number <= scope.last)
    rows = [(int(number), int(count)) for number, count in conn.execute(query)]
    jobs = jobs if sum(count for _, count in rows) >= PARALLEL_FROM else 1
    size = max(1, min(SLICE, -(-len(rows) // jobs)))
    return [(rows[n][0], rows[min(n + size, len(rows)) - 1][0])
            for n in range(0, len(rows), size)], jobs


def _check_in_worker(part: BatchSlice) -> SliceResult:
    with reading(worker_engine(part.url)) as conn:
        return _check_batches(conn, part)


def _as_is(_conn: Connection) -> None:
    """SQLite's connections need no setting up."""


def _check_in_thread(engine: Engine, prepare: Callable[[Connection], None],
                     part: BatchSlice) -> SliceResult:
    with reading(engine) as conn:
        prepare(conn)
        return _check_batches(conn, part)


def _check_batches(conn: Connection, part: BatchSlice) -> SliceResult:
    """The batches of the seals numbered ``part.first``..``part.last`` against their seals;
    PostgreSQL vouches for the clean ones first."""
    result = SliceResult()
    sealed = list(read_seals(conn, first=part.first, last=part.last))
    if conn.dialect.name == "postgresql":
        suspects = list(seal_sql.unvouched(conn, sealed))
        money = money_by_seal(conn, part.first, part.last) if sealed else {}
    else:
        suspects, money = seal_py.unvouched(conn, sealed)
    for seal in suspects:
        for problem in verify_batch(conn, seal):
            result.add(NAME, Row(problem.table, problem.key, problem.problem), part.max_rows)
        result.checked += seal.count
    _check_money(sealed, money, result, part.max_rows)
    return result


def _check_money(sealed: list[Seal], now: Mapping[int, Money], result: SliceResult,
                 max_rows: int) -> None:
    """Each seal's money sums to zero, and the transfers its events name add up to it."""
    for seal in sealed:
        if seal.money is not None:
            problem = _money_problem(seal.money, now.get(seal.number, Money()))
            if problem:
                result.add(MONEY, Row("seals", str(seal.number), problem), max_rows)


def _money_problem(sealed: Money, now: Money) -> str | None:
    if not sealed.balanced:
        return f"the money it sealed does not sum to zero: {sealed.to_json()}"
    if not now.same_as(sealed):
        return (f"the transfers its events name add up to {now.to_json()}, not the "
                f"{sealed.to_json()} it sealed (a transfer edited, deleted, re-pointed or "
                "re-dated after sealing)")
    return None


def _merge(result: SliceResult, found: Findings) -> None:
    for name, count in result.counts.items():
        for row in result.rows[name]:
            found.add(name, row)
        if count > len(result.rows[name]):
            found.note(name, count - len(result.rows[name]))
