"""Row by row, for one token whose control totals disagree: which calls and transfers differ.

Reached only for tokens whose window totals do not match (tampering, a bug, or simply a hold
captured across the window's edge, which checks out here and reports nothing). Every query
is by token (``ix_calls_jti``, ``ix_transfers_debit``) and joins by primary key.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, and_, literal, select

from mcpbill_cli.ledger.models import calls, transfers
from mcpbill_cli.money import format_usd
from mcpbill_cli.reconcile.calls_pass import CHARGE_PREFIX, HOLD_STATUS_OF_CALL
from mcpbill_cli.reconcile.collect import Findings
from mcpbill_cli.reconcile.model import Row, Window
from mcpbill_cli.reconcile.transfers_pass import RESOLVES_TO, TOKEN_PREFIX

c = calls.c
t = transfers.c
spend = transfers.alias("spend")
held = transfers.alias("held")
SPEND_CODES = ("charge", "capture")
TWO_OUTCOMES = "idempotency_key_two_outcomes"
AMOUNT_MISMATCH = "charge_amount_mismatch"


def drill_token(conn: Connection, jti: str, window: Window, found: Findings) -> None:
    """Compare this token's calls and transfers of the window one by one."""
    for row in conn.execute(_calls_with_transfers(jti, window)):
        _check_call(row, found)
    for row in conn.execute(_transfers_with_calls(jti, window)):
        _check_transfer(row, found)
    for row in conn.execute(_resolutions_with_holds(jti, window)):
        _check_resolution(row, found)


def _in_window(column: Any, window: Window) -> Any:
    return and_(column >= window.start, column < window.end)


def _calls_with_transfers(jti: str, window: Window) -> Any:
    return (select(c.id, c.status, c.transfer_id, c.amount, c.amount_held,
                   spend.c.amount.label("spent"), held.c.id.label("hold_id"),
                   held.c.amount.label("hold_amount"), held.c.status.label("hold_status"))
            .select_from(calls.outerjoin(spend, spend.c.id == c.transfer_id)
                         .outerjoin(held, held.c.id == literal("hold:") + c.id))
            .where(c.jti == jti, _in_window(c.created_at, window))
            .order_by(c.created_at, c.id))


def _check_call(row: Any, found: Findings) -> None:
    call = Row("calls", row.id)
    if row.status == "captured" and row.spent is not None and row.spent != row.amount:
        found.add(AMOUNT_MISMATCH, _detail(call, f"call charged {format_usd(row.amount or 0)}"
                                                 f" but {row.transfer_id} moved "
                                                 f"{format_usd(row.spent)}"))
    if (row.transfer_id or "").startswith(CHARGE_PREFIX):
        return
    if row.hold_id is None:
        found.add("call_without_transfer", _detail(call, f"{row.status} call has no hold"))
        return
    if row.hold_amount != row.amount_held:
        found.add(AMOUNT_MISMATCH, _detail(call, f"call held {format_usd(row.amount_held)} but "
                                                 f"{row.hold_id} reserved "
                                                 f"{format_usd(row.hold_amount)}"))
    if HOLD_STATUS_OF_CALL.get(row.status) != row.hold_status:
        found.add(TWO_OUTCOMES, _detail(call, f"call is {row.status} but its hold is "
                                              f"{row.hold_status}"))


def _transfers_with_calls(jti: str, window: Window) -> Any:
    return (select(t.id, t.code, t.amount, t.ref, c.id.label("call_id"),
                   c.status, c.transfer_id)
            .select_from(transfers.outerjoin(calls, c.id == t.ref))
            .where(t.debit_account_id == TOKEN_PREFIX + jti,
                   t.code.in_((*SPEND_CODES, "hold")), _in_window(t.created_at, window))
            .order_by(t.created_at, t.id))


def _check_transfer(row: Any, found: Findings) -> None:
    if row.call_id is None:
        found.add("charge_without_call", Row("transfers", row.id,
                                             f"{row.code} of {format_usd(row.amount)} for call "
                                             f"{row.ref}, which does not exist"))
        return
    call = Row("calls", row.call_id)
    if row.code in SPEND_CODES and (row.status != "captured" or row.transfer_id != row.id):
        found.add(TWO_OUTCOMES, _detail(call, f"{row.id} posted, but the call is "
                                              f"{row.status} by {row.transfer_id}"))
    if row.code == "hold" and (row.id != f"hold:{row.call_id}"
                               or (row.transfer_id or "").startswith(CHARGE_PREFIX)):
        found.add(TWO_OUTCOMES, _detail(call, f"{row.id} holds for a call "
                                              f"{row.status} by {row.transfer_id}"))


def _resolutions_with_holds(jti: str, window: Window) -> Any:
    return (select(t.id, t.code, t.amount, t.pending_id, held.c.status.label("hold_status"),
                   held.c.amount.label("hold_amount"), held.c.ref.label("call_id"))
            .select_from(transfers.outerjoin(held, held.c.id == t.pending_id))
            .where(t.debit_account_id == TOKEN_PREFIX + jti, t.code.in_(tuple(RESOLVES_TO)),
                   _in_window(t.created_at, window))
            .order_by(t.created_at, t.id))


def _check_resolution(row: Any, found: Findings) -> None:
    key = Row("calls", row.call_id) if row.call_id else Row("transfers", row.id)
    if row.hold_status != RESOLVES_TO[row.code]:
        found.add(TWO_OUTCOMES, _detail(key, f"{row.id} resolves {row.pending_id}, which is "
                                             f"{row.hold_status or 'missing'}"))
    elif row.code == "capture" and row.amount > row.hold_amount:
        found.add(AMOUNT_MISMATCH, _detail(key, f"{row.id} captured {format_usd(row.amount)} "
                                                f"of a hold of {format_usd(row.hold_amount)}"))


def _detail(row: Row, detail: str) -> Row:
    return Row(row.table, row.key, detail)
