"""Idempotency keys per tenant (derived ones retire), kept tool results, one content per
pricing version.

Revision ID: 0004
Revises: 0003
"""

import json

import sqlalchemy as sa
from alembic import op

from mcpbill_cli.pricing import document_digest

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("calls") as batch_op:
        batch_op.add_column(sa.Column("result", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("key_retired", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        batch_op.drop_constraint("uq_calls_idempotency_key", type_="unique")
    op.create_index("uq_calls_live_key", "calls", ["tenant", "idempotency_key"], unique=True,
                    sqlite_where=sa.text("NOT key_retired"),
                    postgresql_where=sa.text("NOT key_retired"))
    with op.batch_alter_table("pricing_versions") as batch_op:
        batch_op.add_column(sa.Column("digest", sa.String(length=64), nullable=True))
    _digest_recorded_versions()
    with op.batch_alter_table("pricing_versions") as batch_op:
        batch_op.alter_column("digest", existing_type=sa.String(64), nullable=False)
        batch_op.create_unique_constraint("uq_pricing_versions_digest", ["digest"])


def _digest_recorded_versions() -> None:
    conn = op.get_bind()
    versions = sa.table("pricing_versions", sa.column("version", sa.Integer),
                        sa.column("document", sa.Text), sa.column("digest", sa.String))
    for version, document in conn.execute(sa.select(versions.c.version, versions.c.document)):
        conn.execute(versions.update().where(versions.c.version == version)
                     .values(digest=document_digest(json.loads(document))))


def downgrade() -> None:
    with op.batch_alter_table("pricing_versions") as batch_op:
        batch_op.drop_constraint("uq_pricing_versions_digest", type_="unique")
        batch_op.drop_column("digest")
    op.drop_index("uq_calls_live_key", "calls")
    with op.batch_alter_table("calls") as batch_op:
        batch_op.create_unique_constraint("uq_calls_idempotency_key", ["idempotency_key"])
        batch_op.drop_column("key_retired")
        batch_op.drop_column("result")
