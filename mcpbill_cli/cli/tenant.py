"""`mcpbill tenant list`: every tenant's wallet and tokens in one listing."""

from __future__ import annotations

import typer

from mcpbill_cli.cli.output import (
    Column,
    JsonOption,
    OutputOption,
    emit_listing,
    handles_errors,
    output_format,
    usd_column,
    with_usd,
)
from mcpbill_cli.cli.state import state

app = typer.Typer(help="Tenants: the customers whose wallets fund tokens.", no_args_is_help=True)

_AMOUNTS = ("funded", "allotted", "held", "spent", "available")
LIST_COLUMNS = (
    Column("tenant", lambda s: s.tenant), *(usd_column(name, name) for name in _AMOUNTS),
    Column("tokens", lambda s: s.tokens), Column("active", lambda s: s.active_tokens),
)


@app.command("list")
@handles_errors
def list_tenants(ctx: typer.Context, output: OutputOption = None,
                 as_json: JsonOption = False) -> None:
    """List tenants with their balance (available), allotted, held, spent and token counts.

    Amounts are USDC; `mcpbill wallet balance --tenant NAME` shows one tenant.
    """
    from mcpbill_cli.ledger.engine import reading
    from mcpbill_cli.ledger.tenants import tenant_summaries

    chosen = output_format(output, as_json)
    st = state(ctx)
    now = st.now()
    with reading(st.engine()) as conn:
        summaries = tenant_summaries(conn, now=now)
    emit_listing(summaries, LIST_COLUMNS, output=chosen,
                 records=[with_usd(s, *_AMOUNTS) for s in summaries])
