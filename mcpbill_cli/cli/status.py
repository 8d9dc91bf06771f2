"""`mcpbill status`: the home, its ledger, keys, pricing and chain RPC at a glance, with an
exit code a script can test, like `vault status`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from mcpbill_cli.cli import wallet_chain
from mcpbill_cli.cli.output import (
    JsonOption,
    envelope,
    err,
    exit_code,
    handles_errors,
    print_fields,
    print_json,
)
from mcpbill_cli.cli.state import state

if TYPE_CHECKING:
    from mcpbill_cli.status import Status


@handles_errors
def status(ctx: typer.Context, rpc_url: wallet_chain.RpcUrlOption = None,
           as_json: JsonOption = False) -> None:
    """Show whether this home is ready to bill: home, ledger and its schema, signing keys,
    pricing version, chain RPC (only when one is configured), pending holds, and x402: whether
    pricing.toml turns x402 payments on and, if this home cannot take them, every reason why
    (demo mode, no RPC URL, no deposit address, nothing to settle with...).

    Exits 0 when all is well, else with the exit code of the first problem: 9 not initialized
    or schema outdated, 8 ledger unreachable, 10 bad pricing or chain config, 17 RPC
    unreachable, 18 RPC on another chain. x402 being off is a warning, not a failure: credit
    tokens still pay.

    Example: mcpbill status --json | jq '.data.x402.reasons'
    """
    from mcpbill_cli.status import status as gather

    found, problems = gather(state(ctx).settings, rpc_url=rpc_url)
    errors = [p.to_dict() for p in problems]
    if as_json:
        print_json(envelope(found, errors))
    else:
        _render(found)
        if found.x402.requested and not found.x402.accepting:
            err.print("[bold yellow]warning[/]: pricing.toml turns x402 on, but this home "
                      "cannot accept x402 payments:")
            for reason in found.x402.reasons:
                err.print(f"  - {reason}", markup=False)
        for problem in problems:
            err.print(f"[bold red]error[/] [dim]{problem.code}[/]: ", end="")
            err.print(problem.message, markup=False)
    if problems:
        raise typer.Exit(exit_code(problems[0].code))


def _render(found: Status) -> None:
    ledger, keys, chain = found.ledger, found.keys, found.chain
    rows = {
        "home": found.home + ("" if found.initialized else " (missing)"),
        "mode": found.mode,
        "ledger": ledger.url + ("" if ledger.reachable else " (not reached)"),
        "schema": f"{ledger.schema or '-'} (needs {ledger.required or '-'})",
        "pending holds": _or_dash(ledger.pending_holds),
        "clock": _clock_line(ledger.clock, ledger.clock_offset_seconds,
                             ledger.clock_error_bound_seconds),
        "signing key": f"{keys.active_kid} ({keys.alg}), {keys.count} in the ring"
        if keys.active_kid else "-",
        "pricing version": _or_dash(found.pricing_version),
        "chain": _chain_line(chain.chain, chain.rpc_url, chain.reachable),
        "x402": _x402_line(found),
    }
    print_fields(rows)


def _clock_line(clock: str | None, offset: float | None, bound: float | None) -> str:
    if clock != "database" or offset is None or bound is None:
        return "this host's (the ledger's host)" if clock == "host" else "-"
    return f"the database's; this host's is {offset:+.3f} s off it (± {bound:.3f} s)"


def _chain_line(name: str | None, rpc_url: str | None, reachable: bool | None) -> str:
    if rpc_url is None:
        return f"{name or '-'}: no RPC configured"
    return f"{name}: {rpc_url} ({'reachable' if reachable else 'not reachable'})"


def _x402_line(found: Status) -> str:
    x402 = found.x402
    if not x402.requested:
        return "off (pricing.toml has no [x402])"
    if not x402.accepting:
        return f"off: {len(x402.reasons)} thing(s) missing (see below)"
    return (f"accepting on {x402.chain} ({x402.network}) to {x402.pay_to}, settled by "
            f"{x402.settlement}, {len(x402.tools)} tool(s)")


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)
