"""SQLite hashes the sealed batches in Python, on the raw driver, in one pass per slice.

SQLite has no SHA-256, so every event is read into Python; what costs is everything else per
row. One statement reads a slice's events in (seal, id) order and hands back the driver's own
tuples. Each event's
own hash is :func:`audit.chain_hash` of its fields as stored: SQLite keeps ``at`` as the text
``YYYY-MM-DD HH:MM:SS.ffffff`` (UTC), which becomes the canonical ``...THH:MM:SS.ffffff+00:00``
without a ``datetime``; ``demo`` is 0 or 1. A seal whose events all read that way, count and
span and batch hash and stored hashes as sealed, is vouched for; any other is re-checked by
``seals.verify_batch`` through SQLAlchemy, which names the events: the answer is that one.

The same pass sums each seal's money (``ledger.seal_money``): the transfers its events name,
those created within its events' span (widened by ``SLACK``; ``money_by_seal`` on PostgreSQL
takes the span of the slice's events), read by that span and matched by id in Python.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from mcpbill_cli.ledger import seal_money
from mcpbill_cli.ledger.audit import chain_hash
from mcpbill_cli.ledger.seal_money import Money, account_class, named_transfer
from mcpbill_cli.ledger.seals import Seal, batch_hash

_STORED = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy's DateTime keeps a time in SQLite
_STORED_AT = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", re.ASCII)
_FIELDS = ("id", "hash", "at", "kind", "code", "jti", "token_hash", "tenant", "agent", "tool",
           "amount", "ref", "detail", "demo")


_EVENTS = (f"SELECT events.seal, {', '.join(f'events.{name}' for name in _FIELDS)} "  # noqa: S608
           "FROM events WHERE events.seal >= ? AND events.seal <= ? ORDER BY events.seal, "
           "events.id")
_MOVED = ("SELECT id, amount, kind, debit_account_id, credit_account_id FROM transfers "
          "WHERE created_at >= ? AND created_at <= ?")


@dataclass
class _Batch:
    """What one seal's events showed in the pass."""

    ids: list[int] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    decidable: bool = True
    stored_differ: bool = False
    times: list[str] = field(default_factory=list)  # the events' ``at`` as stored: min, max
    named: list[str] = field(default_factory=list)  # the transfers its events name


def unvouched(conn: Connection, seals: Iterable[Seal]) -> tuple[list[Seal], dict[int, Money]]:
    """The seals among ``seals`` (in order, numbered ``first``..``last``) whose events this
    pass could not show to match (re-check those with ``verify_batch``), and each seal's money
    now. One seal's events are held at a time."""
    listed = {seal.number: seal for seal in seals}
    if not listed:
        return [], {}
    suspects, money = set(listed), {}
    driver = conn.connection.driver_connection
    events, moved = driver.cursor(), driver.cursor()  # type: ignore[union-attr]
    try:
        for number, batch in _read(events, min(listed), max(listed)):
            money[number] = _money(moved, batch)
            if number in listed and _clean(listed[number], batch):
                suspects.discard(number)
    finally:
        events.close()
        moved.close()
    return [listed[number] for number in sorted(suspects)], money


def _read(cursor: Any, first: int, last: int) -> Iterator[tuple[int, _Batch]]:
    """Each seal's batch, in seal order, as the rows come."""
    number, batch = None, _Batch()
    cursor.execute(_EVENTS, (first, last))
    while rows := cursor.fetchmany(5000):
        for row in rows:
            if row[0] != number:
                if number is not None:
                    yield number, batch
                number, batch = row[0], _Batch()
            _add(batch, row[1:])
    if number is not None:
        yield number, batch


def _add(batch: _Batch, row: tuple[Any, ...]) -> None:
    (event_id, stored, at, kind, code, jti, token_hash, tenant, agent, tool, amount, ref,
     detail, demo) = row
    named = named_transfer(kind, ref, jti)
    if named is not None:
        batch.named.append(named)
    text = _canonical_at(at)
    if text is None or demo not in (0, 1):
        batch.decidable = False
        return
    digest = chain_hash("", event_id, text, kind, code, jti, token_hash, tenant, agent, tool,
                        amount, ref, detail, demo)
    batch.ids.append(event_id)
    batch.digests.append(digest)
    batch.stored_differ = batch.stored_differ or stored != digest
    if not batch.times:
        batch.times = [at, at]
    elif at < batch.times[0]:
        batch.times[0] = at
    elif at > batch.times[1]:
        batch.times[1] = at


def _canonical_at(at: Any) -> str | None:
    """``at`` as stored, in the canonical form; None when it is not the stored form (a date
    out of range cannot be the one a sealer hashed: its digest tells)."""
    if type(at) is not str or _STORED_AT.fullmatch(at) is None:
        return None
    return f"{at[:10]}T{at[11:]}+00:00"


def _clean(seal: Seal, batch: _Batch | None) -> bool:
    if batch is None or not batch.decidable or batch.stored_differ:
        return False
    return (len(batch.ids) == seal.count and (batch.ids[0], batch.ids[-1])
            == (seal.first_id, seal.last_id) and batch_hash(batch.digests) == seal.batch_hash)


def _span(batch: _Batch) -> tuple[str, str]:
    """The seal's events' span, widened by ``SLACK``, as stored text (which sorts as time)."""
    if not batch.times:
        return "", ""
    low = datetime.strptime(batch.times[0], _STORED) - seal_money.SLACK  # noqa: DTZ007 - UTC
    high = datetime.strptime(batch.times[1], _STORED) + seal_money.SLACK  # noqa: DTZ007
    return low.strftime(_STORED), high.strftime(_STORED)


def _money(cursor: Any, batch: _Batch) -> Money:
    """The transfers the seal's events name, those created within its events' span (one
    range read of ``ix_transfers_created``, matched here: cheaper than a probe per event)."""
    if not batch.named or not batch.times:
        return Money()
    moved = {row[0]: row for row in cursor.execute(_MOVED, _span(batch))}
    count = total = 0
    posted: dict[str, int] = {}
    pending: dict[str, int] = {}
    for name in batch.named:
        row = moved.get(name)
        if row is None:
            continue
        _, amount, kind, debit, credit = row
        count, total = count + 1, total + amount
        nets = posted if kind in seal_money.POSTED_KINDS else pending
        credited, debited = account_class(credit), account_class(debit)
        nets[credited] = nets.get(credited, 0) + amount
        nets[debited] = nets.get(debited, 0) - amount
    return Money(count, total, posted, pending)
