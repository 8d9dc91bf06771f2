"""Rate limit counters (loop protection): ``rate_counters``, one row per scope, key and fixed
window, counted with one INSERT ... ON CONFLICT DO UPDATE ... WHERE under the limit.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rate_counters",
        sa.Column("scope", sa.String(length=8), nullable=False),
        sa.Column("key", sa.String(length=320), nullable=False),
        sa.Column("window_seconds", sa.Integer(), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("spend", sa.BigInteger(), nullable=False),
        sa.Column("call_limit", sa.BigInteger(), nullable=False),
        sa.Column("spend_limit", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "key", "window_seconds", "window_start"),
    )
    op.create_index("ix_rate_counters_start", "rate_counters", ["window_start"])


def downgrade() -> None:
    op.drop_index("ix_rate_counters_start", table_name="rate_counters")
    op.drop_table("rate_counters")
