"""Refunds: no call refunded past its charge, and refunds that balance.

- ``refund_exceeds_charge``: a call whose ``refunded``, or the sum of its refund rows, is
  more than it charged (the guard of :mod:`mcpbill_cli.ledger.refunds` never lets one pass: a
  row edited by hand does).
- ``refund_mismatch``: a refund row, its ``refund:<id>`` transfer and its ``refund`` event
  (``ref`` the refund id) disagree, one of them is missing or doubled, or a call's
  ``refunded`` differs from the sum of its refund rows.

The window's refunds are read from all three sides (by their own times: a refund's row,
transfer and event are written in one transaction with one time), and the calls they name
or that the window made with something refunded, by primary key. Refunds are rare next to
calls: each side is read in full and compared in Python. Which tokens made the window's
refunded calls, the pass over the window's calls already counted (``calls_pass``): only
their calls are read again, and none on a day without any (at 1M calls, a second scan of
the window's calls took the check from 0.27-0.32 s of PostgreSQL's CPU to 0.71-0.78 s; the
count adds about 0.2 s to the pass).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, null, select, union

from mcpbill_cli.ledger.models import calls, events, refunds, transfers
from mcpbill_cli.money import format_usd
from mcpbill_cli.reconcile.collect import Findings
from mcpbill_cli.reconcile.model import Row, Window

c = calls.c
r = refunds.c
t = transfers.c
e = events.c
EXCEEDS = "refund_exceeds_charge"
MISMATCH = "refund_mismatch"
PREFIX = "refund:"
IN_TOKENS = 500  # tokens named in one query; more: the window's calls are read instead


@dataclass(frozen=True)
class _Side:
    """One refund as one side of the ledger tells it."""

    amount: int
    call: str | None
    credited_to: str | None


def check_refunds(conn: Connection, window: Window, tokens: Sequence[str],
                  found: Findings) -> None:
    """The window's refunds; ``tokens``: those of the window's calls with something
    refunded."""
    _check_sides(conn, window, found)
    _check_calls(conn, window, tokens, found)


def _check_sides(conn: Connection, window: Window, found: Findings) -> None:
    rows = _by_id(conn.execute(
        select(r.id, r.amount, r.call_id, r.credited_to)
        .where(r.created_at >= window.start, r.created_at < window.end)))
    moved = _by_id(conn.execute(
        select(func.substr(t.id, len(PREFIX) + 1), t.amount, t.ref, t.credit_account_id)
        .where(t.code == "refund", t.created_at >= window.start, t.created_at < window.end)))
    written = _by_id(conn.execute(
        select(e.ref, e.amount, null(), null())
        .where(e.kind == "refund", e.at >= window.start, e.at < window.end)))
    for refund_id in sorted(rows.keys() | moved.keys() | written.keys()):
        problem = _disagreement(rows.get(refund_id, []), moved.get(refund_id, []),
                                written.get(refund_id, []))
        if problem:
            found.add(MISMATCH, Row("refunds", str(refund_id), problem))


def _by_id(result: Iterable[Any]) -> dict[str, list[_Side]]:
    sides: dict[str, list[_Side]] = {}
    for refund_id, amount, call, credited_to in result:
        sides.setdefault(str(refund_id), []).append(_Side(int(amount or 0), call, credited_to))
    return sides


def _disagreement(rows: list[_Side], moved: list[_Side], written: list[_Side]) -> str:
    counts = {"refund row": len(rows), "refund transfer": len(moved),
              "refund event": len(written)}
    odd = [f"{n} {what}s" for what, n in counts.items() if n != 1]
    if odd:
        return "the refund has " + ", ".join(odd) + " (one of each expected)"
    row, transfer, event = rows[0], moved[0], written[0]
    if not row.amount == transfer.amount == event.amount:
        return (f"amounts differ: row {format_usd(row.amount)}, transfer "
                f"{format_usd(transfer.amount)}, event {format_usd(event.amount)} USDC")
    if (row.call, row.credited_to) != (transfer.call, transfer.credited_to):
        return (f"the row refunds {row.call} to {row.credited_to}, the transfer "
                f"{transfer.call} to {transfer.credited_to}")
    return ""


def _check_calls(conn: Connection, window: Window, tokens: Sequence[str],
                 found: Findings) -> None:
    """The calls the window's refunds name, and the window's calls with something refunded
    (of ``tokens``; past ``IN_TOKENS`` of them, of any token): refunded within the charge,
    and equal to the sum of their refund rows."""
    named = _named_calls(window, tokens)
    sums = (select(r.call_id, func.sum(r.amount).label("total"))
            .where(r.call_id.in_(select(named.c.id))).group_by(r.call_id).subquery())
    query = (select(c.id, c.amount, c.refunded, func.coalesce(sums.c.total, 0).label("total"))
             .join(named, named.c.id == c.id).outerjoin(sums, sums.c.call_id == c.id)
             .order_by(c.id))
    for call_id, amount, refunded, total in conn.execute(query):
        charged, refunded, total = int(amount or 0), int(refunded), int(total)
        if max(refunded, total) > charged:
            found.add(EXCEEDS, Row("calls", call_id, f"refunded {format_usd(max(refunded, total))}"
                                                     f" of a {format_usd(charged)} USDC charge"))
        if refunded != total:
            found.add(MISMATCH, Row("calls", call_id,
                                    f"refunded {format_usd(refunded)} USDC, its refunds sum to "
                                    f"{format_usd(total)}"))


def _named_calls(window: Window, tokens: Sequence[str]) -> Any:
    """The ids of the calls :func:`_check_calls` checks, each once."""
    named = select(r.call_id.label("id")).where(r.created_at >= window.start,
                                                r.created_at < window.end)
    if not tokens:
        return named.distinct().subquery()
    of_tokens = [c.jti.in_(tokens)] if len(tokens) <= IN_TOKENS else []
    return union(named, select(c.id).where(c.created_at >= window.start,
                                           c.created_at < window.end, c.refunded != 0,
                                           *of_tokens)).subquery()
