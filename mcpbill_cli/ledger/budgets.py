"""Counting paid calls into budget windows (``budget_spend``), in the transaction of the debit.

One row per (scope, tenant, subject, period, window start), created by the first call of the
window (INSERT ... ON CONFLICT DO NOTHING) and raised by one conditional UPDATE
(``amount + x <= cap``) per cap: no interleaving of threads, processes or replicas passes a cap.
A call writes the rows of the caps that apply to it only (issue 14: nothing else is shared).
A void or partial capture gives the unused amount back to the windows the hold was counted in
(the call row's ``budgets`` and ``created_at``), never to "today".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from mcpbill_cli.budgets import Budget, Period, Scope, resets_at, window_key
from mcpbill_cli.ledger import ops
from mcpbill_cli.ledger.fastsql import Prepared
from mcpbill_cli.ledger.models import budget_spend

s = budget_spend.c
_WINDOW = (s.scope == bindparam("b_scope"), s.tenant == bindparam("b_tenant"),
           s.subject == bindparam("b_subject"), s.period == bindparam("b_period"),
           s.period_start == bindparam("b_start"))
_ADD = Prepared(update(budget_spend)
                .where(*_WINDOW, s.amount + bindparam("b_amount") <= bindparam("b_cap"))
                .values(amount=s.amount + bindparam("b_amount")))
# Never below zero, whatever happened to the row: a void must not fail on a window's row.
_GIVE_BACK = Prepared(update(budget_spend)
                      .where(*_WINDOW, s.amount >= bindparam("b_amount"))
                      .values(amount=s.amount - bindparam("b_amount")))
_SPENT = Prepared(select(s.amount).where(*_WINDOW))


@dataclass(frozen=True)
class Spender:
    """Whose spend a call is: its tenant, agent and token."""

    tenant: str
    agent: str
    jti: str

    def subject(self, scope: Scope) -> str:
        return {"tenant": "", "agent": self.agent, "token": self.jti}[scope]


@dataclass(frozen=True)
class CapReached:
    """``budget``'s window has ``spent`` of its cap; it starts again at ``resets_at``."""

    budget: Budget
    spent: int
    resets_at: datetime

    @property
    def left(self) -> int:
        return max(self.budget.cap - self.spent, 0)


def count(conn: Connection, budgets: tuple[Budget, ...], who: Spender, amount: int, *,
          at: datetime) -> CapReached | None:
    """Count ``amount`` into the window at ``at`` of every budget, in order; the first cap it
    would pass, or None. A refusal leaves earlier windows raised: the caller rolls back."""
    for budget in budgets:
        params = _params(budget.scope, budget.period, who, at) | {
            "b_amount": amount, "b_cap": budget.cap}
        if not _counted(conn, budget, params):
            return CapReached(budget, spent(conn, budget.scope, budget.period, who, at),
                              resets_at(budget.period, at))
    return None


def reached(conn: Connection, budgets: tuple[Budget, ...], who: Spender, amount: int, *,
            at: datetime) -> CapReached | None:
    """The first cap ``amount`` would pass at ``at``, as :func:`count` would find it, read
    without writing anything (a preflight's answer: it holds as of this read only)."""
    for budget in budgets:
        used = spent(conn, budget.scope, budget.period, who, at)
        if used + amount > budget.cap:
            return CapReached(budget, used, resets_at(budget.period, at))
    return None


def give_back(conn: Connection, names: str | None, who: Spender, amount: int, *,
              counted_at: datetime) -> None:
    """Return ``amount`` to each window (``"tenant.day agent.month"``) a hold made at
    ``counted_at`` was counted in."""
    if amount <= 0 or not names:
        return
    for name in names.split():
        scope, period = name.split(".")
        _GIVE_BACK.rowcount(conn, {**_params(scope, period, who, counted_at),  # type: ignore[arg-type]
                                   "b_amount": amount})


def spent(conn: Connection, scope: Scope, period: Period, who: Spender, at: datetime) -> int:
    """What ``who`` spent in the ``scope`` window at ``at`` (0 for a window with no row)."""
    row = _SPENT.first(conn, _params(scope, period, who, at))
    return int(row[0]) if row is not None else 0


def names(budgets: tuple[Budget, ...]) -> str | None:
    """What a call row keeps of the windows it was counted in."""
    return " ".join(b.name for b in budgets) or None


def _counted(conn: Connection, budget: Budget, params: dict[str, Any]) -> bool:
    if _ADD.rowcount(conn, params) == 1:
        return True
    if params["b_amount"] <= budget.cap and ops.insert_ignore(conn, budget_spend, {
            "scope": params["b_scope"], "tenant": params["b_tenant"],
            "subject": params["b_subject"], "period": params["b_period"],
            "period_start": params["b_start"], "amount": params["b_amount"]}):
        return True
    return _ADD.rowcount(conn, params) == 1  # another call created the window's row


def _params(scope: Scope, period: Period, who: Spender, at: datetime) -> dict[str, Any]:
    return {"b_scope": scope, "b_tenant": who.tenant, "b_subject": who.subject(scope),
            "b_period": period, "b_start": window_key(period, at)}
