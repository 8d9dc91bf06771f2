"""Deposits by time: ``ix_deposits_credited`` and ``ix_deposits_seen``, so a day's reconcile
reads the deposits credited (or seen unlinked) that day, not every deposit ever recorded.

Revision ID: 0014
Revises: 0013
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_deposits_credited", "deposits", ["credited_at"])
    op.create_index("ix_deposits_seen", "deposits", ["seen_at"])


def downgrade() -> None:
    op.drop_index("ix_deposits_seen", table_name="deposits")
    op.drop_index("ix_deposits_credited", table_name="deposits")
