"""The audit trail against the money: every ``hold``, ``capture``, ``charge``, ``void`` and
``expire`` event of the window has its transfer (``<kind>:<call id>``; the event's ``ref`` is
the call id) and every such transfer of the window has its event, one to one.

An event and its transfer are written in one transaction with one ``at``, so both sides are
read by the window alone. One query sets the window's events (keyed by the transfer id they
name) beside its transfers and groups them by that id: a key with other than one event and
one transfer is a mismatch, either way, and a call's second event too. Only the mismatches
leave the database. (Per direction, an anti-join needs an index on events by transfer id to
find a transfer's event; there is none, and one grouping pass costs less than two joins.)
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, func, literal, null, select, union_all

from mcpbill_cli.ledger.models import events, transfers
from mcpbill_cli.reconcile.collect import Findings
from mcpbill_cli.reconcile.model import Row, Window

e = events.c
t = transfers.c
NAME = "event_transfer_mismatch"
KINDS = ("hold", "capture", "charge", "void", "expire")  # an event's kind is its transfer's code
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
    if not row.moved:
        return Row("events", str(row.first), f"{code} event of call {call} has no transfer "
                                             f"{row.transfer}")
    if not row.written:
        return Row("transfers", row.transfer, f"no {code} event for call {call}")
    return Row("transfers", row.transfer, f"{row.written} {code} events for one call (events "
                                          f"{row.first}..{row.last})")


def _mismatches(window: Window) -> Any:
    written = select((e.kind + ":" + func.coalesce(e.ref, "")).label("transfer"),
                     literal(1).label("written"), literal(0).label("moved"),
                     e.id.label("event")).where(
        e.at >= window.start, e.at < window.end, e.kind.in_(KINDS))
    moved = select(t.id, literal(0), literal(1), null()).where(
        t.created_at >= window.start, t.created_at < window.end, t.code.in_(KINDS))
    both = union_all(written, moved).subquery("both_sides")
    counts = (func.sum(both.c.written), func.sum(both.c.moved))
    return (select(both.c.transfer, counts[0].label("written"), counts[1].label("moved"),
                   func.min(both.c.event).label("first"), func.max(both.c.event).label("last"))
            .group_by(both.c.transfer).having((counts[0] != 1) | (counts[1] != 1))
            .order_by(both.c.transfer))
