"""Refunds of captured calls: ``calls.refunded`` (what refunds gave back of the charge, 0 on
every existing call) and ``refunds`` (one row per refund, with its signed refund receipt).

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("calls", sa.Column("refunded", sa.BigInteger(), nullable=False,
                                     server_default=sa.text("0")))
    op.create_table(
        "refunds",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("call_id", sa.String(length=64), nullable=False),
        sa.Column("jti", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=100), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("requested", sa.BigInteger(), nullable=True),
        sa.Column("refunded_after", sa.BigInteger(), nullable=False),
        sa.Column("credited_to", sa.String(length=200), nullable=False),
        sa.Column("transfer_id", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("receipt", sa.Text(), nullable=False),
        sa.Column("demo", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("amount > 0", name="ck_refunds_amount_positive"),
        sa.ForeignKeyConstraint(["call_id"], ["calls.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_refunds_key"),
    )
    op.create_index("ix_refunds_call", "refunds", ["call_id"])
    op.create_index("ix_refunds_created", "refunds", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_refunds_created", table_name="refunds")
    op.drop_index("ix_refunds_call", table_name="refunds")
    op.drop_table("refunds")
    with op.batch_alter_table("calls") as batch:
        batch.drop_column("refunded")
