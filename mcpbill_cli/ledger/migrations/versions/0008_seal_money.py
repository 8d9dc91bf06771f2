"""Seals carry their money: what the transfers their events name add up to, per class of
account, signed in the seal's JWS (``ledger.seal_money``), so reconcile checks that the
ledger sums to zero at every seal and that no transfer changed after it was sealed.

Seals written before keep ``money`` NULL: they were signed without it and nothing can sign it
for them now. Reconcile checks their links, hashes, signatures and batches as before, and
counts them as sealed without their money; every seal written from now on carries it.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("seals") as batch_op:
        batch_op.add_column(sa.Column("money", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("seals") as batch_op:
        batch_op.drop_column("money")
