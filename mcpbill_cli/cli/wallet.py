"""`mcpbill wallet`: fund a tenant's USDC wallet and show its balance."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpbill_cli.cli import wallet_chain
from mcpbill_cli.cli.options import DEFAULT_TENANT_VALUE, TenantOption
from mcpbill_cli.cli.output import (
    Column,
    JsonOption,
    OutputOption,
    emit,
    emit_listing,
    handles_errors,
    output_format,
    say,
    usd_column,
    with_usd,
)
from mcpbill_cli.cli.state import state
from mcpbill_cli.errors import DemoOnly, InvalidInput
from mcpbill_cli.money import format_usd, parse_usd

app = typer.Typer(help="Tenant wallets: funding and balances.", no_args_is_help=True)

BALANCE_COLUMNS = (Column("tenant", lambda b: b.tenant), *(
    usd_column(name, name) for name in ("funded", "allotted", "held", "spent", "available")))


@app.command("fund")
@handles_errors
def fund(
    ctx: typer.Context,
    tenant: TenantOption = DEFAULT_TENANT_VALUE,
    demo: Annotated[str | None, typer.Option(
        "--demo", metavar="AMOUNT", help="Credit AMOUNT USDC from the demo source "
                                         "(demo mode only), e.g. 10 or 2.50.")] = None,
    tx: Annotated[str | None, typer.Option(
        "--tx", metavar="HASH", help="Credit the USDC this transaction sent to the deposit "
                                     "address (once, when final).")] = None,
    chain: wallet_chain.ChainOption = None,
    rpc_url: wallet_chain.RpcUrlOption = None,
    idempotency_key: Annotated[str | None, typer.Option(
        "--idempotency-key", metavar="KEY", help="With --demo: fund once per KEY (the tenant's); "
                                                 "a retry changes nothing.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Credit a tenant's wallet. Example: mcpbill wallet fund --demo 10"""
    if tx is not None:
        if demo is not None or idempotency_key is not None:
            raise InvalidInput("--tx HASH is credited once by itself: give it without --demo "
                               "and --idempotency-key")
        return wallet_chain.fund_onchain(ctx, tenant, tx, chain, rpc_url, as_json)
    if demo is None:
        raise InvalidInput("say how to fund: --tx HASH (a USDC deposit on chain) or --demo AMOUNT "
                           "(demo mode)")
    _fund_demo(ctx, tenant, parse_usd(demo), idempotency_key, as_json)


def _fund_demo(ctx: typer.Context, tenant: str, amount: int, key: str | None,
               as_json: bool) -> None:
    from mcpbill_cli.ledger.credit import fund_demo
    from mcpbill_cli.ledger.engine import writing

    st = state(ctx)
    if not st.settings.demo:
        raise DemoOnly("demo funding is off in live mode; fund with a USDC deposit instead, "
                       "or set mode = \"demo\" in config.toml")
    now = st.now()
    with writing(st.engine()) as conn:
        result = fund_demo(conn, tenant, amount, now=now, idempotency_key=key)
    done = "already funded" if result.replayed else "funded"
    emit(with_usd(result, "amount", "available"), as_json=as_json, human=lambda: say(
        f"{done} {tenant} with {format_usd(amount)} USDC (demo); "
        f"{format_usd(result.available)} available"))


@app.command("balance")
@handles_errors
def balance(ctx: typer.Context, tenant: TenantOption = DEFAULT_TENANT_VALUE,
            onchain: Annotated[bool, typer.Option(
                "--onchain", help="Show the deposit address's USDC on chain beside the "
                                  "ledger's deposits instead.")] = False,
            chain: wallet_chain.ChainOption = None,
            rpc_url: wallet_chain.RpcUrlOption = None,
            output: OutputOption = None,
            as_json: JsonOption = False) -> None:
    """Show funded, allotted to tokens, held, spent and available, in USDC."""
    chosen = output_format(output, as_json)
    if onchain:
        return wallet_chain.balance_onchain(ctx, chain, rpc_url, chosen)
    from mcpbill_cli.ledger.credit import tenant_balance
    from mcpbill_cli.ledger.engine import reading

    with reading(state(ctx).engine()) as conn:
        bal = tenant_balance(conn, tenant)

    record = with_usd(bal, "funded", "allotted", "held", "spent", "available")
    emit_listing([bal], BALANCE_COLUMNS, output=chosen, records=[record], data=record)


app.command("address")(wallet_chain.address)
app.command("create")(wallet_chain.create)
app.command("link")(wallet_chain.link)
app.command("sync")(wallet_chain.sync)
