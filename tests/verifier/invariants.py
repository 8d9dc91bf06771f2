"""The ledger invariants of DESIGN.md, recomputed from the rows: ``assert_ledger_invariants``."""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from typing import Any

from sqlalchemy import Connection, func, select

from mcpbill_cli.ledger.models import accounts, calls, tokens, transfers

a = accounts.c
t = transfers.c
c = calls.c
tk = tokens.c

POSTED_KINDS = ("posted", "post_pending")
SPEND_CODES = ("charge", "capture")
HOLD_STATUS_OF_CALL = {"held": "pending", "voided": "voided", "expired": "expired",
                       "captured": "posted"}


def assert_ledger_invariants(conn: Connection) -> None:
    """Every invariant DESIGN.md promises, checked against the database as it is now."""
    rows = conn.execute(select(a.id, a.guarded, a.debits_posted, a.credits_posted,
                               a.debits_pending, a.credits_pending)).all()
    _sums_balance(rows)
    _no_guarded_overdraft(rows)
    _sums_match_transfers(conn, rows)
    _each_charge_has_one_receipt(conn)
    _calls_match_their_holds(conn)
    _idempotency_keys_unique(conn)
    _spent_within_limit(conn)


def _sums_balance(rows: list[Any]) -> None:
    posted = sum(r.credits_posted - r.debits_posted for r in rows)
    assert posted == 0, f"sum of posted balances is {posted}, not 0"
    credits_pending = sum(r.credits_pending for r in rows)
    debits_pending = sum(r.debits_pending for r in rows)
    assert credits_pending == debits_pending, (credits_pending, debits_pending)


def _no_guarded_overdraft(rows: list[Any]) -> None:
    available = {r.id: r.credits_posted - r.debits_posted - r.debits_pending for r in rows}
    over = [(r.id, available[r.id]) for r in rows if r.guarded and available[r.id] < 0]
    assert not over, f"guarded accounts below zero: {over}"


def _sums_match_transfers(conn: Connection, rows: list[Any]) -> None:
    def per(side: Any, *where: Any) -> dict[str, int]:
        query = select(side, func.sum(t.amount)).where(*where).group_by(side)
        return defaultdict(int, {k: int(v) for k, v in conn.execute(query)})

    dp = per(t.debit_account_id, t.kind.in_(POSTED_KINDS))
    cp = per(t.credit_account_id, t.kind.in_(POSTED_KINDS))
    open_hold = (t.kind == "pending", t.status == "pending")
    dpend = per(t.debit_account_id, *open_hold)
    cpend = per(t.credit_account_id, *open_hold)
    wrong = [(r.id, (r.debits_posted, r.credits_posted, r.debits_pending, r.credits_pending),
              (dp[r.id], cp[r.id], dpend[r.id], cpend[r.id])) for r in rows
             if (r.debits_posted, r.credits_posted, r.debits_pending, r.credits_pending)
             != (dp[r.id], cp[r.id], dpend[r.id], cpend[r.id])]
    assert not wrong, f"account sums differ from their transfers (stored, recomputed): {wrong}"
    known = {r.id for r in rows}
    assert set(dp) | set(cp) | set(dpend) | set(cpend) <= known


def _each_charge_has_one_receipt(conn: Connection) -> None:
    spends = conn.execute(select(t.id, t.ref, t.amount, t.kind, t.code).where(
        t.kind.in_(POSTED_KINDS), t.code.in_(SPEND_CODES))).all()
    by_call: dict[str, list[Any]] = defaultdict(list)
    for row in spends:
        by_call[row.ref].append(row)
    captured = {r.id: r for r in conn.execute(select(
        c.id, c.idempotency_key, c.amount, c.transfer_id, c.receipt, c.status))}
    for call_id, moves in by_call.items():
        assert len(moves) == 1, f"call {call_id} was posted {len(moves)} times: {moves}"
        call = captured.get(call_id)
        assert call is not None, f"posted transfer {moves[0].id} has no call row"
        assert call.status == "captured", (call_id, call.status)
    for call in captured.values():
        if call.status != "captured":
            assert call.receipt is None, f"{call.status} call {call.id} has a receipt"
            continue
        moves = by_call.get(call.id, [])
        if call.amount:
            assert len(moves) == 1, f"captured call {call.id} has {len(moves)} posted transfers"
        if not moves:
            continue
        assert call.transfer_id == moves[0].id and call.amount == moves[0].amount, call
        assert call.receipt, f"captured call {call.id} has no receipt"
        signed = _claims_of(call.receipt)
        assert (signed["receiptId"], int(signed["amount"]), signed["idempotencyKey"]) == (
            call.id, call.amount, call.idempotency_key), signed


def _calls_match_their_holds(conn: Connection) -> None:
    holds = dict(conn.execute(select(t.ref, t.status).where(t.kind == "pending")).all())
    for call_id, status in conn.execute(select(c.id, c.status)):
        if call_id in holds:
            assert holds[call_id] == HOLD_STATUS_OF_CALL[status], (call_id, status,
                                                                  holds[call_id])
        else:
            assert status == "captured", f"{status} call {call_id} has no hold"


def _idempotency_keys_unique(conn: Connection) -> None:
    twice = conn.execute(select(c.tenant, c.idempotency_key).where(c.key_retired.is_(False))
                         .group_by(c.tenant, c.idempotency_key)
                         .having(func.count() > 1)).all()
    assert not twice, f"idempotency keys used twice in a tenant: {twice}"


def _spent_within_limit(conn: Connection) -> None:
    spent = (select(func.coalesce(func.sum(t.amount), 0))
             .where(t.debit_account_id == "token:" + tk.jti, t.code.in_(SPEND_CODES),
                    t.kind.in_(POSTED_KINDS)).scalar_subquery())
    over = conn.execute(select(tk.jti, tk.limit_micro, spent.label("spent"))
                        .where(spent > tk.limit_micro)).all()
    assert not over, f"tokens spent past their limit: {over}"


def _claims_of(jws: str) -> dict[str, Any]:
    """A receipt's payload, unverified (the tests verify signatures with the JWKS elsewhere)."""
    body = jws.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return claims
