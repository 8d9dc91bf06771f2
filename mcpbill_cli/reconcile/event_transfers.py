"""The audit trail against the money: every ``hold``, ``capture``, ``charge``, ``void`` and
``expire`` event of the window has its transfer (``<kind>:<call id>``; the event's ``ref`` is
the call id) and every such transfer of the window has its event, one to one, and the two say
the same: the amount, and the token the money left (the event's ``jti``, the transfer's debit
account). So are ``deposit`` and ``issue`` events and their transfers (a deposit's, an
allotment's or a child token's), one to one: the amount, and the tenant credited (a
deposit's) or the token allotted (an issue's).

A sealed event cannot be edited without breaking its seal, so these find a transfer moved
after sealing to another tenant or token with the accounts' sums edited to match: the seal's
money signs only per class of account, and such a move keeps every class's net.

An event and its transfer are written in one transaction with one ``at``, so both sides are
read by the window alone. One query sets the window's events (keyed by the transfer id they
name) beside its transfers and groups them by that id: a key with other than one event and
one transfer, or whose event and transfer differ, is a mismatch, either way, and a call's
second event too. Only the mismatches leave the database. (Per direction, an anti-join needs
an index on events by transfer id to find a transfer's event; there is none, and one grouping
pass costs less than two joins.)
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, case, func, literal, null, select, union_all

from mcpbill_cli.ledger.models import events, transfers
from mcpbill_cli.ledger.seal_money import named_transfer_sql
from mcpbill_cli.reconcile.collect import Findings
from mcpbill_cli.reconcile.model import Row, Window

e = events.c
t = transfers.c
NAME = "event_transfer_mismatch"
KINDS = ("hold", "capture", "charge", "void", "expire")  # an event's kind is its transfer's code
ALLOTTED = ("deposit", "allot", "child")  # the codes of a deposit's and an issue's transfer
Mismatches = tuple[list[Row], int]  # up to max_rows of them, and how many more


def event_transfer_mismatches(conn: Connection, window: Window, max_rows: int) -> Mismatches:
    """The window's mismatches (found on a connection of its own: recorded by
    :func:`note_mismatches`)."""
    listed: list[Row] = []
    extra = 0
    for row in conn.execute(_mismatches(window)):
        if len(listed) < max_rows:
            listed.append(_row(row))
        else:
            extra += 1  # counted, not listed: a broken day may have a million
    return listed, extra


def note_mismatches(mismatches: Mismatches, found: Findings) -> None:
    listed, extra = mismatches
    for row in listed:
        found.add(NAME, row)
    if extra:
        found.note(NAME, extra)


def _row(row: Any) -> Row:
    code, _, call = row.transfer.partition(":")
    if code not in KINDS:  # a deposit's or an allotment's
        return _money_row(row)
    if not row.moved:
        return Row("events", str(row.first), f"{code} event of call {call} has no transfer "
                                             f"{row.transfer}")
    if not row.written:
        return Row("transfers", row.transfer, f"no {code} event for call {call}")
    if row.written > 1:
        return Row("transfers", row.transfer, f"{row.written} {code} events for one call "
                                              f"(events {row.first}..{row.last})")
    return Row("transfers", row.transfer, f"its {code} event {row.first} says another amount "
                                          "or token (the transfer was edited or re-pointed "
                                          "after)")


def _money_row(row: Any) -> Row:
    if not row.moved:
        return Row("events", str(row.first), f"names transfer {row.transfer}, which is not "
                                             "in the window")
    if not row.written:
        return Row("transfers", row.transfer, "no event names it")
    if row.written > 1:
        return Row("transfers", row.transfer, f"{row.written} events name it (events "
                                              f"{row.first}..{row.last})")
    return Row("transfers", row.transfer, f"its event {row.first} names {row.named} and "
                                          f"{row.amount} micro-USDC; the transfer moved "
                                          f"{row.moved_amount} to or from {row.account} "
                                          "(edited or re-pointed after)")


def _mismatches(window: Window) -> Any:
    money_kinds = (*KINDS, "deposit", "issue")
    account = case((e.kind == "deposit", "tenant:" + func.coalesce(e.tenant, "")),
                   else_="token:" + func.coalesce(e.jti, ""))
    written = select(named_transfer_sql().label("transfer"), literal(1).label("written"),
                     literal(0).label("moved"), e.id.label("event"), e.amount.label("amount"),
                     account.label("account")).where(
        e.at >= window.start, e.at < window.end, e.kind.in_(money_kinds))
    # A call's transfer moves money from the token; a deposit's and an allotment's to the
    # tenant or token their event names.
    moved_account = case((t.code.in_(KINDS), t.debit_account_id), else_=t.credit_account_id)
    moved = select(t.id, literal(0), literal(1), null(), t.amount, moved_account).where(
        t.created_at >= window.start, t.created_at < window.end,
        t.code.in_((*KINDS, *ALLOTTED)))
    both = union_all(written, moved).subquery("both_sides")
    counts = (func.sum(both.c.written), func.sum(both.c.moved))
    differ = ((func.min(both.c.amount) != func.max(both.c.amount))
              | (func.min(both.c.account) != func.max(both.c.account))
              | (func.count(both.c.amount) != func.count()))  # an event without its amount

    def side(column: Any, is_event: bool) -> Any:  # one side's value, for the finding's words
        return func.max(case((both.c.written == int(is_event), column)))

    return (select(both.c.transfer, counts[0].label("written"), counts[1].label("moved"),
                   func.min(both.c.event).label("first"), func.max(both.c.event).label("last"),
                   side(both.c.amount, True).label("amount"),
                   side(both.c.amount, False).label("moved_amount"),
                   side(both.c.account, True).label("named"),
                   side(both.c.account, False).label("account"))
            .group_by(both.c.transfer).having((counts[0] != 1) | (counts[1] != 1) | differ)
            .order_by(both.c.transfer))
