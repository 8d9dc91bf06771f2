"""Snapshots of the ledger's sums: each reconciled window's end (``ledger_snapshots``) and, for
every account that moved since the snapshot before, its posted sums and spending then
(``account_snapshots``), so that the next reconcile reads the transfers from there on, not
every transfer ever made.

A ledger upgraded to 0006 has no snapshot yet: its first reconcile checks the whole history
once and takes one.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ledger_snapshots",
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("base", sa.DateTime(timezone=True), nullable=True),
        sa.Column("accounts", sa.Integer(), nullable=False),
        sa.Column("written_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("at"),
    )
    op.create_table(
        "account_snapshots",
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("account", sa.String(length=200), nullable=False),
        sa.Column("debits_posted", sa.BigInteger(), nullable=False),
        sa.Column("credits_posted", sa.BigInteger(), nullable=False),
        sa.Column("spent", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("at", "account"),
    )
    op.create_index("ix_account_snapshots_account", "account_snapshots", ["account", "at"])


def downgrade() -> None:
    op.drop_index("ix_account_snapshots_account", table_name="account_snapshots")
    op.drop_table("account_snapshots")
    op.drop_table("ledger_snapshots")
