"""The `mcpbill` command: composes one Typer sub-app per command group, nothing more."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mcpbill_cli.__about__ import __version__
from mcpbill_cli.cli import (
    completion,
    config,
    db,
    demo,
    init,
    keys,
    pricing,
    receipt,
    revoke,
    token,
    wallet,
    x402,
)
from mcpbill_cli.cli.output import envelope, exit_code, print_json
from mcpbill_cli.cli.state import State
from mcpbill_cli.config import ENV_DB_URL, ENV_HOME

app = typer.Typer(
    name="mcpbill",
    help="Sell MCP tool calls to AI agents per call, in USDC: fund wallets, mint spend-capped "
         "credit tokens, price tools, reconcile the ledger.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mcpbill {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    home: Annotated[str | None, typer.Option(
        "--home", envvar=ENV_HOME, help="mcpbill home (config, keys, pricing, SQLite ledger).",
        show_default="the platform config dir, e.g. ~/.config/mcpbill")] = None,
    db_url: Annotated[str | None, typer.Option(
        "--db-url", envvar=ENV_DB_URL, show_default="sqlite:///<home>/ledger.db",
        help="Ledger database URL, e.g. postgresql+psycopg://user@host/db.")] = None,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    state = State(home, db_url)
    ctx.obj = state
    ctx.call_on_close(state.close)


app.command("init")(init.init)
app.add_typer(config.app, name="config")
app.add_typer(db.app, name="db")
app.add_typer(keys.app, name="keys")
app.add_typer(wallet.app, name="wallet")
app.add_typer(token.app, name="token")
app.add_typer(pricing.app, name="pricing")
app.add_typer(receipt.app, name="receipt")
app.add_typer(x402.app, name="x402")
app.command("revoke")(revoke.revoke)
app.add_typer(revoke.revocations_app, name="revocations")
app.command("completion")(completion.completion)
app.command("demo")(demo.demo)


def main() -> None:
    """Console entry point. With ``--json``, usage errors also come out as one JSON document."""
    if "--json" not in sys.argv[1:]:
        app(prog_name="mcpbill")
        return
    from typer._click.exceptions import ClickException

    try:
        result = app(prog_name="mcpbill", standalone_mode=False)
    except typer.Abort:
        sys.exit(1)
    except ClickException as exc:
        print_json(envelope(None, [{"code": "USAGE_ERROR", "message": exc.format_message()}]))
        sys.exit(exit_code("USAGE_ERROR"))
    sys.exit(result if isinstance(result, int) else 0)
