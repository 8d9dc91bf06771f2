"""Alembic environment: runs on the connection mcpbill hands it (see ``ledger.schema``)."""

from alembic import context

from mcpbill_cli.ledger.models import with_partial_indexes

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=with_partial_indexes(),
                  render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
