"""Budgets over time: ``budget_spend`` (spend per tenant, agent or token per UTC day or calendar
month) replaces ``tenant_daily_spend``, whose rows move over as tenant/day windows; a token's
own caps, auto top-up and rate limits (``tokens``); the windows each call's hold was counted in
(``calls.budgets``: held calls counted in their tenant's day at upgrade get ``tenant.day``).

Revision ID: 0013
Revises: 0012
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_TOKEN_COLUMNS = ("daily_cap_micro", "monthly_cap_micro", "topup_below_micro", "topup_to_micro")


def upgrade() -> None:
    op.create_table(
        "budget_spend",
        sa.Column("scope", sa.String(length=8), nullable=False),
        sa.Column("tenant", sa.String(length=100), nullable=False),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("period_start", sa.String(length=10), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount >= 0", name="ck_budget_spend_nonnegative"),
        sa.PrimaryKeyConstraint("scope", "tenant", "subject", "period", "period_start"),
    )
    op.execute("INSERT INTO budget_spend (scope, tenant, subject, period, period_start, amount) "
               "SELECT 'tenant', tenant, '', 'day', day, amount FROM tenant_daily_spend")
    op.add_column("calls", sa.Column("budgets", sa.String(length=100), nullable=True))
    _mark_held_calls_counted()
    op.drop_table("tenant_daily_spend")
    for name in _TOKEN_COLUMNS:
        op.add_column("tokens", sa.Column(name, sa.BigInteger(), nullable=True))
    op.add_column("tokens", sa.Column("rate_limits", sa.Text(), nullable=True))


def _mark_held_calls_counted() -> None:
    """A call held before the upgrade was counted in its tenant's day when that tenant had a
    daily cap (a row for the day): its void must give that back."""
    conn = op.get_bind()
    held = conn.execute(sa.text("SELECT id, tenant, created_at FROM calls WHERE status = 'held'"))
    for call_id, tenant, created_at in list(held):
        counted = conn.execute(sa.text(
            "SELECT 1 FROM tenant_daily_spend WHERE tenant = :tenant AND day = :day"),
            {"tenant": tenant, "day": _utc_day(created_at)}).first()
        if counted is not None:
            conn.execute(sa.text("UPDATE calls SET budgets = 'tenant.day' WHERE id = :id"),
                         {"id": call_id})


def _utc_day(created_at: datetime | str) -> str:
    """YYYY-MM-DD of a stored time (SQLite: naive text in UTC; PostgreSQL: aware)."""
    moment = datetime.fromisoformat(created_at) if isinstance(created_at, str) else created_at
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d")


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("rate_limits")
        for name in reversed(_TOKEN_COLUMNS):
            batch.drop_column(name)
    op.create_table(
        "tenant_daily_spend",
        sa.Column("tenant", sa.String(length=100), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount >= 0", name="ck_daily_spend_nonnegative"),
        sa.PrimaryKeyConstraint("tenant", "day"),
    )
    op.execute("INSERT INTO tenant_daily_spend (tenant, day, amount) "
               "SELECT tenant, period_start, amount FROM budget_spend "
               "WHERE scope = 'tenant' AND period = 'day'")
    with op.batch_alter_table("calls") as batch:
        batch.drop_column("budgets")
    op.drop_table("budget_spend")
