"""The audit trail against the money: every ``hold``, ``capture``, ``charge``, ``void`` and
``expire`` event of the window has its transfer (``<kind>:<call id>``; the event's ``ref`` is
the call id) and every such transfer of the window has its event, one to one.

An event and its transfer are written in one transaction with one ``at``, so both sides are
read by the window alone and compared with two anti-joins that return only what does not
match. One to one: when both anti-joins are empty, every event has a transfer and every
transfer an event, so equal counts per kind leave no room for a second event of one call;
only a kind whose counts differ is grouped to name the calls with several.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Connection, exists, func, select

from mcpbill_cli.ledger.models import events, transfers
from mcpbill_cli.reconcile.collect import Findings
from mcpbill_cli.reconcile.model import Row, Window

e = events.c
t = transfers.c
NAME = "event_transfer_mismatch"
KINDS = ("hold", "capture", "charge", "void", "expire")  # an event's kind is its transfer's code


def check_event_transfers(conn: Connection, window: Window, moved: Mapping[str, int],
                          found: Findings) -> None:
    """``moved``: the window's transfers counted by code (from the transfers pass)."""
    _list(found, (Row("events", str(row.id), f"{row.kind} event of call {row.ref} has no "
                                             f"transfer {row.kind}:{row.ref}")
                  for row in conn.execute(_events_without_transfers(window))))
    _list(found, (Row("transfers", row.id, f"no {row.code} event for call {row.ref}")
                  for row in conn.execute(_transfers_without_events(window))))
    written = _event_counts(conn, window)
    for kind in KINDS:
        if written.get(kind, 0) > moved.get(kind, 0):
            _list(found, (Row("transfers", f"{kind}:{row.ref}", f"{row.n} {kind} events for "
                                                                f"one call (events {row.first}"
                                                                f"..{row.last})")
                          for row in conn.execute(_repeated(window, kind))))


def _list(found: Findings, rows: Iterable[Row]) -> None:
    """Count every row; keep only the first ``max_rows`` (a broken day may have a million)."""
    extra = 0
    for row in rows:
        if found.full(NAME):
            extra += 1
        else:
            found.add(NAME, row)
    if extra:
        found.note(NAME, extra)


def _in_window(column: Any, window: Window) -> Any:
    return (column >= window.start) & (column < window.end)


def _events_without_transfers(window: Window) -> Any:
    transfer_id = e.kind + ":" + e.ref
    matched = exists().where(t.id == transfer_id, _in_window(t.created_at, window),
                             t.code.in_(KINDS))
    return (select(e.id, e.kind, e.ref)
            .where(_in_window(e.at, window), e.kind.in_(KINDS), ~matched).order_by(e.id))


def _transfers_without_events(window: Window) -> Any:
    matched = exists().where(e.kind + ":" + e.ref == t.id, _in_window(e.at, window),
                             e.kind.in_(KINDS))
    return (select(t.id, t.code, t.ref)
            .where(_in_window(t.created_at, window), t.code.in_(KINDS), ~matched)
            .order_by(t.id))


def _event_counts(conn: Connection, window: Window) -> dict[str, int]:
    query = (select(e.kind, func.count()).where(_in_window(e.at, window), e.kind.in_(KINDS))
             .group_by(e.kind))
    return {kind: int(count) for kind, count in conn.execute(query)}


def _repeated(window: Window, kind: str) -> Any:
    return (select(e.ref, func.count().label("n"), func.min(e.id).label("first"),
                   func.max(e.id).label("last"))
            .where(_in_window(e.at, window), e.kind == kind)
            .group_by(e.ref).having(func.count() > 1).order_by(e.ref))
