"""Hash-chain the audit trail: every event stores the hash of the one before.

Revision ID: 0002
Revises: 0001
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

from mcpbill_cli.ledger.audit import CHAIN_FIELDS, GENESIS, event_hash

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("events") as batch_op:
        batch_op.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("hash", sa.String(length=64), nullable=True))
    seq, head = _chain_existing_events()
    op.bulk_insert(sa.table("audit_head", sa.column("id", sa.Integer),
                            sa.column("seq", sa.BigInteger), sa.column("hash", sa.String)),
                   [{"id": 1, "seq": seq, "hash": head}])
    with op.batch_alter_table("events") as batch_op:
        batch_op.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)
        batch_op.alter_column("prev_hash", existing_type=sa.String(64), nullable=False)
        batch_op.alter_column("hash", existing_type=sa.String(64), nullable=False)
        batch_op.create_unique_constraint("uq_events_seq", ["seq"])


def _chain_existing_events() -> tuple[int, str]:
    """Chain the events a 0001 ledger already has, in the order they were written."""
    conn = op.get_bind()
    typed: dict[str, Any] = {"at": sa.DateTime(timezone=True), "demo": sa.Boolean(),
                             "amount": sa.BigInteger()}
    events = sa.table("events", sa.column("id"),
                      *(sa.column(f, typed.get(f)) for f in CHAIN_FIELDS if f != "seq"),
                      sa.column("seq"), sa.column("prev_hash"), sa.column("hash"))
    head, seq = GENESIS, 0
    rows = conn.execute(sa.select(events).order_by(events.c.id)).mappings().all()
    for row in rows:
        seq += 1
        digest = event_hash(head, {**row, "seq": seq})
        conn.execute(events.update().where(events.c.id == row["id"])
                     .values(seq=seq, prev_hash=head, hash=digest))
        head = digest
    return seq, head


def downgrade() -> None:
    with op.batch_alter_table("events") as batch_op:
        batch_op.drop_constraint("uq_events_seq", type_="unique")
        batch_op.drop_column("hash")
        batch_op.drop_column("prev_hash")
        batch_op.drop_column("seq")
    op.drop_table("audit_head")
