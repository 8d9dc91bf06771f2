"""x402 payments accepted for tool calls (``x402_payments``): one row per EIP-3009
authorization, keyed by network, asset, payer and nonce, reserved before the tool runs and
marked settled, failed or released after, so that one authorization is settled at most once
by every replica sharing the ledger.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "x402_payments",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("network", sa.String(length=64), nullable=False),
        sa.Column("asset", sa.String(length=42), nullable=False),
        sa.Column("payer", sa.String(length=42), nullable=False),
        sa.Column("nonce", sa.String(length=66), nullable=False),
        sa.Column("tenant", sa.String(length=100), nullable=False),
        sa.Column("agent", sa.String(length=200), nullable=False),
        sa.Column("tool", sa.String(length=200), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("valid_before", sa.BigInteger(), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("call_id", sa.String(length=64), nullable=True),
        sa.Column("tx_hash", sa.String(length=66), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("reserved_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount > 0", name="ck_x402_payments_amount_positive"),
        sa.CheckConstraint("status IN ('reserved', 'settled', 'failed', 'released')",
                           name="ck_x402_payments_status"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_x402_payments_status", "x402_payments", ["status", "reserved_at"])


def downgrade() -> None:
    op.drop_index("ix_x402_payments_status", table_name="x402_payments")
    op.drop_table("x402_payments")
