"""When money crosses a line, an alert event (:func:`outbox.emit`) in the same transaction.

Each check reads what the guarded statement that moved the money returned (the balance just
after it), so it costs nothing until a line is crossed, and concurrent moves of one account
(which that statement serialises) see each crossing exactly once: the move that crossed it.
A balance that goes back over a line (a void, a refund, a topup) and crosses it again is a new
crossing, with a new event.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, select

from mcpbill_cli.ledger import ops, outbox
from mcpbill_cli.ledger.models import tenant_alerts
from mcpbill_cli.money import format_usd

# A token's use (spent and held) as a share of what it was credited, in percent.
TOKEN_THRESHOLDS = (80, 100)


def crossed(used_before: int, used_after: int, limit: int) -> list[int]:
    """The thresholds of :data:`TOKEN_THRESHOLDS` that ``used`` went up through."""
    return [p for p in TOKEN_THRESHOLDS
            if used_before * 100 < p * limit <= used_after * 100]


def token_debited(conn: Connection, *, jti: str, tenant: str, agent: str, amount: int,
                  available: int, credited: int, at: datetime) -> None:
    """After a debit of ``amount`` left a token ``available`` of the ``credited`` it got."""
    used_after = credited - available
    for percent in crossed(used_after - amount, used_after, credited):
        outbox.emit(conn, "token.threshold", {
            "jti": jti, "tenant": tenant, "agent": agent, "percent": percent,
            "limit_usd": format_usd(credited), "used_usd": format_usd(used_after),
            "available_usd": format_usd(available)}, at=at)


def tenant_debited(conn: Connection, *, account: str, amount: int, at: datetime) -> None:
    """After a debit of ``amount`` from a tenant's ``account`` (a token issue, a topup), in
    its transaction: under its alert amount, from at or over it, is a ``tenant.balance_low``
    event. The debit's UPDATE holds the account's row, so the balance read here is the one it
    left. Whoever debits a tenant calls it (`token issue`, `token topup`)."""
    tenant = account.removeprefix("tenant:")
    below = conn.execute(select(tenant_alerts.c.below)
                         .where(tenant_alerts.c.tenant == tenant)).scalar()
    if below is None:
        return
    available = ops.balance(conn, account).available
    if not available < below <= available + amount:
        return
    outbox.emit(conn, "tenant.balance_low", {
        "tenant": tenant, "available_usd": format_usd(available),
        "below_usd": format_usd(int(below))}, at=at)


def cap_reached(conn: Connection, *, tenant: str, window: str, period: str, cap: int,
                spent: int, at: datetime, agent: str | None = None) -> str | None:
    """A ``cap.reached`` event, once per tenant (and agent), ``window`` (``day``, ``month``...)
    and ``period`` (``2026-12-05``...): later refusals in the period add nothing. Returns the
    event id when this call wrote it. Run it in the transaction that records the refusal."""
    event_id = outbox.stable_event_id("cap.reached", tenant, agent or "", window, period)
    return outbox.emit(conn, "cap.reached", {
        "tenant": tenant, "agent": agent, "window": window, "period": period,
        "cap_usd": format_usd(cap), "spent_usd": format_usd(spent)}, at=at, event_id=event_id)


def set_tenant_alert(conn: Connection, tenant: str, below: int | None) -> None:
    """Alert when ``tenant``'s available balance falls under ``below``; None: never."""
    conn.execute(tenant_alerts.delete().where(tenant_alerts.c.tenant == tenant))
    if below is not None:
        conn.execute(tenant_alerts.insert().values(tenant=tenant, below=below))
