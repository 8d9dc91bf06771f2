"""`mcpbill pricing show | set | unset | validate | diff | quote`: the pricing table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mcpbill_cli import pricing
from mcpbill_cli.cli import complete
from mcpbill_cli.cli.options import DryRunOption
from mcpbill_cli.cli.output import (
    Column,
    JsonOption,
    Output,
    OutputOption,
    emit,
    emit_listing,
    err,
    handles_errors,
    is_terminal,
    out,
    output_format,
    say,
    show_listing,
    wire_to_cli,
)
from mcpbill_cli.cli.state import state
from mcpbill_cli.errors import LedgerUnavailable, NotInitialized, SchemaOutdated
from mcpbill_cli.money import format_usd, parse_usd

if TYPE_CHECKING:
    from sqlalchemy import Engine

app = typer.Typer(
    help="Show, edit, check and compare the pricing table (pricing.toml in the home). "
         "Edits rewrite the file in normal form, without comments.",
    no_args_is_help=True,
)

TenantOption = Annotated[str | None, typer.Option(
    "--tenant", "-t", help="Price as this tenant sees it (its own prices and discount).",
    autocompletion=complete.tenants)]
SHEET_COLUMNS = (Column("tool", lambda t: t[0]), Column("price (USDC)", lambda t: t[1].describe()),
                 Column("rule", lambda t: t[1].rule))


def _pricing_path(ctx: typer.Context) -> Path:
    return state(ctx).settings.pricing_path


@app.command("show")
@handles_errors
def show(ctx: typer.Context, tenant: TenantOption = None, output: OutputOption = None,
         as_json: JsonOption = False) -> None:
    """Show the effective price of every listed tool, the default and the free tiers."""
    chosen = output_format(output, as_json)
    sheet = pricing.price_sheet(pricing.load_pricing(_pricing_path(ctx)), tenant)
    data = wire_to_cli(sheet.to_dict())
    if chosen is Output.table:
        _render_sheet(sheet)
    else:
        emit_listing(sheet.tools, SHEET_COLUMNS, output=chosen, records=data["tools"], data=data)


# "-1" is a price to refuse with INVALID_INPUT, not an unknown option.
@app.command("set", context_settings={"ignore_unknown_options": True})
@handles_errors
def set_price(
    ctx: typer.Context,
    tool: Annotated[str, typer.Argument(
        help="The exact tool name, e.g. search or db.write.", autocompletion=complete.tools)],
    price: Annotated[str, typer.Argument(help="USDC per call (or per unit), e.g. 0.002 or 0.")],
    tenant: Annotated[str | None, typer.Option(
        "--tenant", "-t", help="Set this tenant's own price (its discount does not apply).",
        autocompletion=complete.tenants)] = None,
    per_unit: Annotated[bool, typer.Option(
        "--per-unit", help="PRICE is per unit the tool reports (tokens, rows); needs --max.")
    ] = False,
    max_price: Annotated[str | None, typer.Option(
        "--max", help="With --per-unit: the most one call may cost, what a call holds.")
    ] = None,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
) -> None:
    """Set a tool's price (for everyone, or for one tenant). Bumps the table version, past
    every version the ledger charged with, unless the price is already that (then nothing is
    written)."""
    amount = parse_usd(price, allow_zero=True, field="price")
    cap = None if max_price is None else parse_usd(max_price, allow_zero=True, field="max")
    edit = pricing.edit_pricing(_pricing_path(ctx), lambda table: pricing.set_price(
        table, tool, amount, tenant=tenant, per_unit=per_unit, max_amount=cap), dry_run=dry_run,
        recorded_version=_latest_recorded(ctx))
    _emit_edit(edit, _pricing_path(ctx), dry_run=dry_run, as_json=as_json)


@app.command("unset")
@handles_errors
def unset_price(
    ctx: typer.Context,
    tool: Annotated[str, typer.Argument(
        help="The tool whose own price to remove.", autocompletion=complete.tools)],
    tenant: Annotated[str | None, typer.Option(
        "--tenant", "-t", help="Remove this tenant's own price instead.",
        autocompletion=complete.tenants)] = None,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
) -> None:
    """Remove a tool's own price; it then falls to the free tiers or the default price."""
    edit = pricing.edit_pricing(
        _pricing_path(ctx), lambda table: pricing.unset_price(table, tool, tenant=tenant),
        dry_run=dry_run, recorded_version=_latest_recorded(ctx))
    _emit_edit(edit, _pricing_path(ctx), dry_run=dry_run, as_json=as_json)


@app.command("validate")
@handles_errors
def validate(
    ctx: typer.Context,
    file: Annotated[Path | None, typer.Argument(
        help="The file to check.", show_default="pricing.toml in the home")] = None,
    as_json: JsonOption = False,
) -> None:
    """Check a pricing file without changing anything; exit 10 with the key path if it is bad,
    or if the home's ledger charged with other prices under its version.

    When the file turns x402 on (``\\[x402]``), it also says whether this home can accept x402
    payments under it and, if not, every reason why (a warning: the file is still valid).

    Example: mcpbill pricing validate new-pricing.toml --json | jq '.data.x402.reasons'
    """
    from dataclasses import asdict

    from mcpbill_cli.x402.readiness import readiness

    path = file or _pricing_path(ctx)
    table = pricing.load_pricing(path)
    recorded = _version_recorded(ctx, table, path)
    x402 = readiness(state(ctx).settings, table)
    data = {"path": str(path), "pricing_version": table.version, "tools": len(table.tools),
            "tenants": len(table.tenants), "version_recorded": recorded, "x402": asdict(x402)}
    emit(data, as_json=as_json, human=lambda: out.print(
        f"{path}: valid, version {table.version}, {len(table.tools)} tool(s), "
        f"{len(table.tenants)} tenant(s)"))
    if x402.requested and not x402.accepting and not as_json:
        err.print("[bold yellow]warning[/]: this file turns x402 on, but this home cannot "
                  "accept x402 payments:")
        for reason in x402.reasons:
            err.print(f"  - {reason}", markup=False)


def _version_recorded(ctx: typer.Context, table: pricing.PricingTable, path: Path) -> bool:
    """Whether the home's ledger recorded exactly ``table``; False without a ledger to ask."""
    from mcpbill_cli.ledger.engine import reading
    from mcpbill_cli.ledger.pricing_versions import check_version

    engine = _existing_ledger(ctx)
    if engine is None:
        return False
    with reading(engine) as conn:
        return check_version(conn, table, source=str(path))


def _latest_recorded(ctx: typer.Context) -> int:
    """The highest version the home's ledger charged with, which an edit must go past; 0
    without a ledger to ask."""
    from mcpbill_cli.ledger.engine import reading
    from mcpbill_cli.ledger.pricing_versions import latest_version

    engine = _existing_ledger(ctx)
    if engine is None:
        return 0
    with reading(engine) as conn:
        return latest_version(conn) or 0


def _existing_ledger(ctx: typer.Context) -> Engine | None:
    """The home's ledger if it exists and is at this schema; never creates a SQLite file."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    st = state(ctx)
    try:
        url = make_url(st.settings.db_url)
    except ArgumentError:
        return None
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").expanduser().is_file():
        return None
    try:
        return st.engine()
    except (NotInitialized, SchemaOutdated):
        return None
    except LedgerUnavailable as exc:
        say(f"not checked against the ledger: {exc.message}")
        return None


@app.command("diff")
@handles_errors
def diff(
    ctx: typer.Context,
    other_file: Annotated[Path, typer.Argument(help="The pricing file to compare with.")],
    as_json: JsonOption = False,
) -> None:
    """Show what would change, per tool and tenant, if OTHER_FILE replaced the current table."""
    path = _pricing_path(ctx)
    current, other = pricing.load_pricing(path), pricing.load_pricing(other_file)
    changes = pricing.diff_tables(current, other)
    data = {"from": {"path": str(path), "pricing_version": current.version},
            "to": {"path": str(other_file), "pricing_version": other.version},
            "changes": [change.to_dict() for change in changes]}
    emit(data, as_json=as_json, human=lambda: _render_changes(changes))


@app.command("quote")
@handles_errors
def quote(
    ctx: typer.Context,
    tool: Annotated[str, typer.Argument(help="The tool to price.",
                                                autocompletion=complete.tools)],
    tenant: TenantOption = None,
    units: Annotated[int | None, typer.Option(
        "--units", min=0, help="Units a per-unit tool reported; without it, the maximum.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Print what one call costs (USDC) on stdout, and which rule decided on stderr."""
    table = pricing.load_pricing(_pricing_path(ctx))
    price = pricing.quote(table, tool, tenant=tenant, units=units)
    data = {"tool": tool, "tenant": tenant, "units": units, **wire_to_cli(price.to_dict())}
    emit(data, as_json=as_json, human=lambda: _render_quote(price, units))


# --- rendering -------------------------------------------------------------------------------


_CAP_PERIODS = {"daily_cap": "per UTC day", "monthly_cap": "per UTC month",
                "agent_daily_cap": "per agent per UTC day",
                "agent_monthly_cap": "per agent per UTC month"}


def _render_sheet(sheet: pricing.PriceSheet) -> None:
    if sheet.tenant is not None and not sheet.tenant_has_terms:
        say(f"tenant {sheet.tenant!r} has no terms of its own: these are everyone's prices")
    who = f" for tenant {sheet.tenant}" if sheet.tenant else ""
    # Off a terminal stdout holds only the tools, one a line; the rest is told on stderr.
    def note(text: str) -> None:
        (out if is_terminal(sys.stdout) else err).print(text, markup=False)

    note(f"pricing version {sheet.version}{who}")
    show_listing(sheet.tools, SHEET_COLUMNS)
    if sheet.default is None:
        note("other tools: refused (no default_price)")
    else:
        note(f"other tools: {sheet.default.describe()} ({sheet.default.rule})")
    if sheet.free_tiers:
        note(f"free tiers: {', '.join(sheet.free_tiers)}")
    for key, cap in sheet.caps.items():
        if cap is not None:
            note(f"{key.replace('_', ' ')}: {format_usd(cap)} USDC {_CAP_PERIODS[key]}")


def _emit_edit(edit: pricing.PricingEdit, path: Path, *, dry_run: bool, as_json: bool) -> None:
    changes = edit.changes
    data: dict[str, Any] = {
        "path": str(path), "previous_version": edit.before.version,
        "pricing_version": edit.after.version, "changes": [c.to_dict() for c in changes],
        "changed": edit.changed, "dry_run": dry_run,
    }

    def human() -> None:
        if not edit.changed:
            say(f"nothing to change: {path} stays at pricing version {edit.before.version}")
            return
        _render_changes(changes)
        if dry_run:
            say(f"would write pricing version {edit.after.version} to {path}")
        else:
            say(f"wrote pricing version {edit.after.version} to {path}")

    emit(data, as_json=as_json, human=human)


def _render_changes(changes: list[pricing.Change]) -> None:
    if not changes:
        say("no changes")
        return
    for change in changes:
        out.print(f"{change.kind:<8} {change.key}: {change.before or '-'} -> {change.after or '-'}")


def _render_quote(price: pricing.Price, units: int | None) -> None:
    out.print(format_usd(price.amount))
    per_unit_max = price.per_unit is not None and units is None
    held = " (the most a call may cost: no --units given)" if per_unit_max else ""
    say(f"{price.describe()}{held}; rule {price.rule}, pricing version {price.version}")
