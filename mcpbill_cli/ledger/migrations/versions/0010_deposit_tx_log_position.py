"""Deposits keyed by their place in the transaction: ``deposits.tx_log_position`` (the log's
index among the logs of its transaction's receipt) and the unique key
``uq_deposits_tx_log (chain, tx_hash, tx_log_position)`` in place of ``uq_deposits_log``
(chain, tx_hash, block-wide log index).

A block-wide log index changes when a reorganisation re-mines the transaction at another place
in a block; the position within the transaction does not. Keyed by the old index, a transfer
credited once and re-mined after a reorg deeper than the confirmations was credited again.

Existing rows keep ``tx_log_position`` NULL: the position is the log's index in the receipt,
and the ledger alone cannot compute it (the block-wide index of the transaction's first log is
not stored, and the transaction's other logs, which are not deposits, are not either). Reading
the chain inside a migration is not an option (no RPC at ``mcpbill db upgrade``, and a node that
pruned the receipt). Instead the code adopts such a row the first time it meets its transfer
again (``wallet/crediting.py`` ``find_recorded``): same chain and transaction, same sender,
recipient, token and amount, preferring the same log index; it stamps the position then. So an
old row is never credited a second time, and a rescan fills the column in.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deposits") as batch_op:
        batch_op.add_column(sa.Column("tx_log_position", sa.Integer(), nullable=True))
        batch_op.drop_constraint("uq_deposits_log", type_="unique")
        batch_op.create_unique_constraint("uq_deposits_tx_log",
                                          ["chain", "tx_hash", "tx_log_position"])


def downgrade() -> None:
    with op.batch_alter_table("deposits") as batch_op:
        batch_op.drop_constraint("uq_deposits_tx_log", type_="unique")
        batch_op.drop_column("tx_log_position")
        batch_op.create_unique_constraint("uq_deposits_log", ["chain", "tx_hash", "log_index"])
