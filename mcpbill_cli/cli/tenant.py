"""`mcpbill tenant list`: every tenant's wallet and tokens in one listing."""

from __future__ import annotations

import typer

from mcpbill_cli.cli.output import JsonOption, emit, handles_errors, new_table, out, with_usd
from mcpbill_cli.cli.state import state
from mcpbill_cli.clock import utcnow
from mcpbill_cli.money import format_usd

app = typer.Typer(help="Tenants: the customers whose wallets fund tokens.", no_args_is_help=True)

_AMOUNTS = ("funded", "allotted", "held", "spent", "available")


@app.command("list")
@handles_errors
def list_tenants(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List tenants with their balance (available), allotted, held, spent and token counts.

    Amounts are USDC; `mcpbill wallet balance --tenant NAME` shows one tenant.
    """
    from mcpbill_cli.ledger.engine import reading
    from mcpbill_cli.ledger.tenants import tenant_summaries

    with reading(state(ctx).engine()) as conn:
        summaries = tenant_summaries(conn, now=utcnow())

    def human() -> None:
        table = new_table("tenant", "funded", "allotted", "held", "spent", "available", "tokens",
                          "active")
        for s in summaries:
            table.add_row(s.tenant, *(format_usd(getattr(s, name)) for name in _AMOUNTS),
                          str(s.tokens), str(s.active_tokens))
        out.print(table)

    emit([with_usd(s, *_AMOUNTS) for s in summaries], as_json=as_json, human=human)
