"""The first ledger schema: accounts, transfers, tokens, calls, events, deposits and wallet links.

Revision ID: 0001
Revises: (none)
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("guarded", sa.Boolean(), nullable=False),
        sa.Column("closed", sa.Boolean(), nullable=False),
        sa.Column("debits_posted", sa.BigInteger(), nullable=False),
        sa.Column("credits_posted", sa.BigInteger(), nullable=False),
        sa.Column("debits_pending", sa.BigInteger(), nullable=False),
        sa.Column("credits_pending", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "NOT guarded OR credits_posted - debits_posted - debits_pending >= 0",
            name="ck_accounts_no_overdraft",
        ),
        sa.CheckConstraint(
            "debits_posted >= 0 AND credits_posted >= 0 AND debits_pending >= 0"
            " AND credits_pending >= 0",
            name="ck_accounts_sums_nonnegative",
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "calls",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("jti", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=100), nullable=False),
        sa.Column("agent", sa.String(length=200), nullable=False),
        sa.Column("tool", sa.String(length=200), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=True),
        sa.Column("amount_held", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("transfer_id", sa.String(length=200), nullable=True),
        sa.Column("timeout_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pricing_version", sa.Integer(), nullable=False),
        sa.Column("price_rule", sa.String(length=200), nullable=False),
        sa.Column("receipt", sa.Text(), nullable=True),
        sa.Column("demo", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key", name="uq_calls_idempotency_key"),
    )
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.create_index("ix_calls_created", ["created_at"], unique=False)
        batch_op.create_index("ix_calls_jti", ["jti"], unique=False)

    op.create_table(
        "events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("code", sa.String(length=40), nullable=True),
        sa.Column("jti", sa.String(length=64), nullable=True),
        sa.Column("token_hash", sa.String(length=64), nullable=True),
        sa.Column("tenant", sa.String(length=100), nullable=True),
        sa.Column("agent", sa.String(length=200), nullable=True),
        sa.Column("tool", sa.String(length=200), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=True),
        sa.Column("ref", sa.String(length=200), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("demo", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_at", ["at"], unique=False)

    op.create_table(
        "scan_checkpoints",
        sa.Column("chain", sa.String(length=64), nullable=False),
        sa.Column("block_number", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("chain"),
    )
    op.create_table(
        "tenant_daily_spend",
        sa.Column("tenant", sa.String(length=100), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount >= 0", name="ck_daily_spend_nonnegative"),
        sa.PrimaryKeyConstraint("tenant", "day"),
    )
    op.create_table(
        "tokens",
        sa.Column("jti", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=100), nullable=False),
        sa.Column("agent", sa.String(length=200), nullable=False),
        sa.Column("kid", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("audience", sa.String(length=200), nullable=False),
        sa.Column("parent_jti", sa.String(length=64), nullable=True),
        sa.Column("limit_micro", sa.BigInteger(), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoke_reason", sa.Text(), nullable=True),
        sa.Column("demo", sa.Boolean(), nullable=False),
        sa.CheckConstraint("limit_micro > 0", name="ck_tokens_limit_positive"),
        sa.ForeignKeyConstraint(
            ["parent_jti"],
            ["tokens.jti"],
        ),
        sa.PrimaryKeyConstraint("jti"),
    )
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.create_index("ix_tokens_parent", ["parent_jti"], unique=False)
        batch_op.create_index("ix_tokens_tenant", ["tenant"], unique=False)

    op.create_table(
        "wallet_links",
        sa.Column("address", sa.String(length=42), nullable=False),
        sa.Column("tenant", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("address"),
    )
    op.create_table(
        "transfers",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("debit_account_id", sa.String(length=200), nullable=False),
        sa.Column("credit_account_id", sa.String(length=200), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("pending_id", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=10), nullable=True),
        sa.Column("timeout_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("code", sa.String(length=16), nullable=False),
        sa.Column("ref", sa.String(length=200), nullable=True),
        sa.Column("demo", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("amount >= 0", name="ck_transfers_amount_nonnegative"),
        sa.CheckConstraint(
            "debit_account_id <> credit_account_id", name="ck_transfers_two_accounts"
        ),
        sa.ForeignKeyConstraint(
            ["credit_account_id"],
            ["accounts.id"],
        ),
        sa.ForeignKeyConstraint(
            ["debit_account_id"],
            ["accounts.id"],
        ),
        sa.ForeignKeyConstraint(
            ["pending_id"],
            ["transfers.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("transfers", schema=None) as batch_op:
        batch_op.create_index("ix_transfers_created", ["created_at"], unique=False)
        batch_op.create_index("ix_transfers_credit", ["credit_account_id"], unique=False)
        batch_op.create_index("ix_transfers_debit", ["debit_account_id"], unique=False)
        batch_op.create_index("ix_transfers_pending_open", ["status", "timeout_at"], unique=False)

    op.create_table(
        "deposits",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("chain", sa.String(length=64), nullable=False),
        sa.Column("tx_hash", sa.String(length=66), nullable=False),
        sa.Column("log_index", sa.Integer(), nullable=False),
        sa.Column("block_number", sa.BigInteger(), nullable=False),
        sa.Column("sender", sa.String(length=42), nullable=False),
        sa.Column("recipient", sa.String(length=42), nullable=False),
        sa.Column("token_address", sa.String(length=42), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("tenant", sa.String(length=100), nullable=True),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("transfer_id", sa.String(length=200), nullable=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("credited_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount > 0", name="ck_deposits_amount_positive"),
        sa.ForeignKeyConstraint(
            ["transfer_id"],
            ["transfers.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("chain", "tx_hash", "log_index", name="uq_deposits_log"),
    )
    # The one account every charge credits; it exists from the start so the hot path never
    # has to create it.
    accounts = sa.table(
        "accounts",
        sa.column("id", sa.String),
        sa.column("kind", sa.String),
        sa.column("guarded", sa.Boolean),
        sa.column("closed", sa.Boolean),
        sa.column("debits_posted", sa.BigInteger),
        sa.column("credits_posted", sa.BigInteger),
        sa.column("debits_pending", sa.BigInteger),
        sa.column("credits_pending", sa.BigInteger),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    op.bulk_insert(
        accounts,
        [
            {
                "id": "revenue",
                "kind": "revenue",
                "guarded": False,
                "closed": False,
                "debits_posted": 0,
                "credits_posted": 0,
                "debits_pending": 0,
                "credits_pending": 0,
                "created_at": datetime.now(UTC),
            }
        ],
    )


def downgrade() -> None:
    op.drop_table("deposits")
    with op.batch_alter_table("transfers", schema=None) as batch_op:
        batch_op.drop_index("ix_transfers_pending_open")
        batch_op.drop_index("ix_transfers_debit")
        batch_op.drop_index("ix_transfers_credit")
        batch_op.drop_index("ix_transfers_created")

    op.drop_table("transfers")
    op.drop_table("wallet_links")
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.drop_index("ix_tokens_tenant")
        batch_op.drop_index("ix_tokens_parent")

    op.drop_table("tokens")
    op.drop_table("tenant_daily_spend")
    op.drop_table("scan_checkpoints")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_at")

    op.drop_table("events")
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.drop_index("ix_calls_jti")
        batch_op.drop_index("ix_calls_created")

    op.drop_table("calls")
    op.drop_table("accounts")
