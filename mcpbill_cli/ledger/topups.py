"""Auto top-up: a token refilled from its tenant when a capture leaves it under a threshold.

A token issued with ``--topup-below B --topup-to T`` is topped up, after a capture leaves it
under ``B`` available, with ``T - available`` from its tenant (a child: its parent), bounded by
what the source has available and by what the tenant's caps still allow this day and month.
It is a normal ``token topup`` (a ``topup`` transfer, the token's limit raised by as much, a
``topup`` event marked ``auto``), so reconcile sees nothing new; like ``token topup``, one
that takes its tenant under the tenant's alert amount emits ``tenant.balance_low``.

Once per crossing: the top-up runs in its own short transaction after the capture committed,
and takes the token's account row first (FOR UPDATE on PostgreSQL, the write lock on SQLite),
the order ``token topup`` and revoke use. Captures racing past the threshold each try; the
first moves the money, the others find the token at or over ``B`` once they hold the row, and
move nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from mcpbill_cli.budgets import Budget, TokenTerms
from mcpbill_cli.clock import aware
from mcpbill_cli.ledger import alerts, budgets, ops, token_changes
from mcpbill_cli.ledger.models import accounts, tokens

tk = tokens.c


def auto_topup(conn: Connection, jti: str, wanted: TokenTerms, *, tenant_caps: tuple[Budget, ...],
               now: datetime) -> token_changes.TopUp | None:
    """Top the token up to ``wanted.topup_to`` if it is still under ``wanted.topup_below``
    once its account row is held; None when nothing moved (over the threshold, not active,
    nothing available at the source, the tenant's caps reached)."""
    if wanted.topup_below is None or wanted.topup_to is None:
        return None
    row = _lock_active(conn, jti, now)
    if row is None:
        return None
    available = ops.balance(conn, ops.token_account(jti)).available
    if not wanted.wants_topup(available):
        return None  # another capture's top-up came first
    source = (ops.token_account(row.parent_jti) if row.parent_jti
              else ops.tenant_account(row.tenant))
    amount = min(wanted.topup_to - available, ops.balance(conn, source).available,
                 _cap_room(conn, tenant_caps, row, now))
    if amount <= 0:
        return None
    done = token_changes.topup(conn, jti, amount, now=now, detail={"auto": True})
    if not row.parent_jti:
        alerts.tenant_debited(conn, account=source, amount=amount, at=now)
    return done


def _lock_active(conn: Connection, jti: str, now: datetime) -> Any:
    conn.execute(select(accounts.c.id).where(accounts.c.id == ops.token_account(jti))
                 .with_for_update()).all()
    row = conn.execute(select(tokens).where(tk.jti == jti)).one_or_none()
    if row is None or row.revoked_at is not None or aware(row.expires_at) <= now:
        return None
    return row


def _cap_room(conn: Connection, caps: tuple[Budget, ...], row: Any, now: datetime) -> int:
    """What the tenant's caps still allow in their windows at ``now`` (unbounded: no cap)."""
    who = budgets.Spender(row.tenant, row.agent, row.jti)
    room = [cap.cap - budgets.spent(conn, cap.scope, cap.period, who, now) for cap in caps]
    return min(room, default=2**63 - 1)
