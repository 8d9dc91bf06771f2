"""No shared row on the call path: audit events append without a lock and are sealed in signed
batches (``seals``); refusals of garbage are counted, not written one by one; every token gets
a revenue account of its own.

The 0002-0004 hash chain is verified first: a ledger whose chain is broken is not migrated
(reconcile it with the mcpbill that wrote it). Its events are then left unsealed, for the
first sealer (``mcpbill db upgrade`` runs one right after, with the home's signing key).

Revision ID: 0005
Revises: 0004
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

from mcpbill_cli.errors import AuditChainBroken
from mcpbill_cli.ledger.audit import CHAIN_FIELDS, GENESIS, event_hash

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    _verify_chain()
    with op.batch_alter_table("events") as batch_op:
        batch_op.drop_constraint("uq_events_seq", type_="unique")
        batch_op.drop_column("seq")
        batch_op.drop_column("prev_hash")
        batch_op.alter_column("hash", existing_type=sa.String(64), nullable=True)
        batch_op.add_column(sa.Column("seal", sa.BigInteger(), nullable=True))
    op.execute("UPDATE events SET hash = NULL")  # chain hashes; a seal writes the event's own
    op.create_index("ix_events_seal", "events", ["seal"])
    op.drop_table("audit_head")
    op.create_table(
        "seals",
        sa.Column("number", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("first_id", sa.BigInteger(), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("batch_hash", sa.String(length=64), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("sealed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kid", sa.String(length=64), nullable=False),
        sa.Column("jws", sa.Text(), nullable=False),
        sa.CheckConstraint("count > 0 AND first_id <= last_id", name="ck_seals_span"),
        sa.PrimaryKeyConstraint("number"),
    )
    op.create_table(
        "refusal_counts",
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("code", sa.String(length=40), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=False),
        sa.Column("source", sa.String(length=100), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("sample", sa.String(length=64), nullable=True),
        sa.CheckConstraint("count > 0", name="ck_refusal_counts_positive"),
        sa.PrimaryKeyConstraint("minute", "code", "reason", "source"),
    )
    _revenue_accounts()


def _verify_chain() -> None:
    conn = op.get_bind()
    typed: dict[str, Any] = {"at": sa.DateTime(timezone=True), "demo": sa.Boolean(),
                             "amount": sa.BigInteger()}
    events = sa.table("events", *(sa.column(f, typed.get(f)) for f in CHAIN_FIELDS),
                      sa.column("prev_hash"), sa.column("hash"))
    head = sa.table("audit_head", sa.column("seq"), sa.column("hash"))
    expected_seq, expected_prev = 1, GENESIS
    rows = conn.execute(sa.select(events).order_by(events.c.seq)
                        .execution_options(stream_results=True, yield_per=5000))
    try:
        for row in rows.mappings():
            if row["seq"] != expected_seq or row["prev_hash"] != expected_prev or (
                    event_hash(row["prev_hash"], dict(row)) != row["hash"]):
                raise AuditChainBroken(
                    f"the audit chain breaks at event {expected_seq}, so this ledger is not "
                    "upgraded (sealing would vouch for it): find what changed with `mcpbill "
                    "reconcile --chain full` using the mcpbill that wrote it", seq=expected_seq)
            expected_seq, expected_prev = expected_seq + 1, row["hash"]
    finally:
        rows.close()  # a server-side cursor on PostgreSQL, even when the chain breaks
    last = conn.execute(sa.select(head.c.seq, head.c.hash)).one()
    if (last.seq, last.hash) != (expected_seq - 1, expected_prev):
        raise AuditChainBroken(
            "the audit chain's end does not match audit_head (events deleted), so this ledger "
            "is not upgraded: find what changed with `mcpbill reconcile --chain full` using "
            "the mcpbill that wrote it", seq=int(last.seq))


def _revenue_accounts() -> None:
    """``revenue:<jti>`` for every token, beside the old shared ``revenue`` (which keeps what
    it earned and settles the holds it still has pending)."""
    op.execute(
        "INSERT INTO accounts (id, kind, guarded, closed, debits_posted, credits_posted, "
        "debits_pending, credits_pending, created_at) "
        "SELECT 'revenue:' || jti, 'revenue', false, false, 0, 0, 0, 0, issued_at FROM tokens")


def downgrade() -> None:
    raise NotImplementedError("a sealed audit trail cannot be turned back into a 0004 chain")
