"""`mcpbill reconcile` and `mcpbill events export`: parse, call the core, render.

Registered by ``cli/__init__.py``: ``app.command("reconcile")(reconcile.reconcile)`` and
``app.add_typer(reconcile.events_app, name="events")``.
"""

from __future__ import annotations

import csv
import enum
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.table import Table

from mcpbill_cli.cli import complete
from mcpbill_cli.cli.output import (
    EXIT_CODES,
    JsonOption,
    emit,
    envelope,
    handles_errors,
    out,
    print_json,
    say,
    to_jsonable,
)
from mcpbill_cli.cli.state import State, state
from mcpbill_cli.clock import utcnow
from mcpbill_cli.money import format_usd
from mcpbill_cli.wallet.chains import ENV_RPC_URL

if TYPE_CHECKING:
    from mcpbill_cli.reconcile import ChainReader, ReconcileReport, Totals

# A reconcile that found discrepancies (errors; with --strict, warnings too) exits with this.
FINDINGS_CODE = "RECONCILE_FINDINGS"
FINDINGS_EXIT_CODE = EXIT_CODES.get(FINDINGS_CODE, 20)

events_app = typer.Typer(help="The audit trail, sealed in signed batches.", no_args_is_help=True)


class ChainMode(enum.StrEnum):
    window = "window"
    full = "full"
    off = "off"


class Dimension(enum.StrEnum):
    tenant = "tenant"
    agent = "agent"
    tool = "tool"
    token = "token"  # noqa: S105 - a dimension, not a secret


@handles_errors
def reconcile(
    ctx: typer.Context,
    day: Annotated[str | None, typer.Option(
        "--date", metavar="YYYY-MM-DD", help="The UTC day to reconcile.",
        show_default="yesterday (UTC)")] = None,
    since: Annotated[str | None, typer.Option(
        "--from", help="Start of the window: a date or an ISO 8601 time (UTC unless it says "
                       "otherwise).")] = None,
    until: Annotated[str | None, typer.Option(
        "--to", help="End of the window (excluded).", show_default="now")] = None,
    tenant: Annotated[str | None, typer.Option(
        "--tenant", "-t", help="Only this tenant's totals and charges.",
        autocompletion=complete.tenants)] = None,
    agent: Annotated[str | None, typer.Option(
        "--agent", help="Only this agent's.", autocompletion=complete.agents)] = None,
    tool: Annotated[str | None, typer.Option(
        "--tool", help="Only this tool's.", autocompletion=complete.tools)] = None,
    by: Annotated[list[Dimension] | None, typer.Option(
        "--by", help="Totals tables to print (repeat); --json and --csv have them all.",
        show_default="tenant and tool")] = None,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Warnings fail the run too (exit 20).")] = False,
    verify_receipts: Annotated[bool, typer.Option(
        "--verify-receipts", help="Also verify every receipt's signature and signed fields "
                                  "(~0.2 ms each, spread over --jobs processes).")] = False,
    chain: Annotated[ChainMode, typer.Option(
        "--chain", help="The sealed audit trail: check the seals holding the window's events "
                        "(each linked to the one before), every seal from the first, or none. "
                        "Signatures are checked with the home's key ring.")] = ChainMode.window,
    onchain: Annotated[bool, typer.Option(
        "--onchain", help="Re-read each deposit's transaction on chain and compare the deposit "
                          "address's balance (needs an RPC URL).")] = False,
    rpc_url: Annotated[str | None, typer.Option(
        "--rpc-url", envvar=ENV_RPC_URL, show_default="rpc_url of each chain in config.toml",
        help="JSON-RPC endpoint for --onchain.")] = None,
    window_only: Annotated[bool, typer.Option(
        "--window-only", help="Skip the ledger-wide invariants (balances, stored sums, token "
                              "limits, captured calls posted).")] = False,
    full_history: Annotated[bool, typer.Option(
        "--full-history", help="Check the stored sums against every transfer ever made, not "
                               "from the last snapshot of the sums: slower, it finds a "
                               "transfer edited before the snapshot.")] = False,
    no_snapshot: Annotated[bool, typer.Option(
        "--no-snapshot", help="Write nothing: leave no snapshot of the sums at the window's end "
                              "for the next reconcile to start from (a read-only role, a "
                              "replica).")] = False,
    jobs: Annotated[int | None, typer.Option(
        "--jobs", min=1, help="Processes for hashing sealed events and verifying receipts.",
        show_default="the CPU count")] = None,
    max_rows: Annotated[int, typer.Option(
        "--max-rows", min=1, help="Rows listed per finding (all are counted).")] = 100,
    as_csv: Annotated[bool, typer.Option(
        "--csv", help="Print the totals as CSV (findings go to stderr; the exit code "
                      "says).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Check the ledger over a day (or --from/--to): totals, and every discrepancy found.

    Exits 0 when clean and 20 when there are findings of severity error (with --strict,
    warnings too), so CI can gate on it. The ledger-wide checks start from the snapshot of the
    sums the day before left, and leave one at the window's end. Example: mcpbill reconcile
    --date 2026-11-27 --json
    """
    from mcpbill_cli.reconcile import Filters, ReconcileOptions, Window
    from mcpbill_cli.reconcile import reconcile as run_reconcile

    st = state(ctx)
    window = Window.parse(day=day, since=since, until=until, now=utcnow())
    options = ReconcileOptions(
        window=window, filters=Filters(tenant, agent, tool), chain=chain.value,
        verify_receipts=verify_receipts, keys_dir=st.settings.keys_dir,
        onchain=_chain_reader(st, rpc_url) if onchain else None, leeway=st.settings.leeway,
        jobs=jobs or os.cpu_count() or 1, max_rows=max_rows, ledger_wide=not window_only,
        full_history=full_history, snapshots=not no_snapshot)
    if not as_json and not as_csv:
        say(f"reconciling {window.start.isoformat()} .. {window.end.isoformat()}")
    report = run_reconcile(st.engine(), options)
    _render(report, strict=strict, as_json=as_json, as_csv=as_csv,
            dimensions=[d.value for d in by] if by else ["tenant", "tool"])
    if report.failed(strict=strict):
        raise typer.Exit(FINDINGS_EXIT_CODE)


def _chain_reader(st: State, override: str | None) -> ChainReader:
    def read(caip2: str) -> tuple[Any, Any]:
        from mcpbill_cli.wallet import chains
        from mcpbill_cli.wallet.rpc import Rpc, connect

        chain = chains.resolve_chain(caip2, st.settings.file)
        return chain, Rpc(connect(chains.rpc_url(chain, override)))

    return read


# --- rendering ----------------------------------------------------------------------------------


def report_json(report: ReconcileReport) -> dict[str, Any]:
    """The report as JSON: amounts as ``*_usd`` decimal strings, the anchor (the last seal
    checked) as ``{"seal", "hash"}``."""
    data: dict[str, Any] = to_jsonable(report)
    data["summary"] = _totals_json(report.summary)
    data["totals"] = {dimension: {key: _totals_json(totals) for key, totals in keyed.items()}
                      for dimension, keyed in report.totals.items()}
    anchor = report.audit_anchor
    data["audit_anchor"] = None if anchor is None else {"seal": anchor[0], "hash": anchor[1]}
    data["errors"], data["warnings"] = report.errors, report.warnings
    return data


def _totals_json(totals: Totals) -> dict[str, Any]:
    data: dict[str, Any] = to_jsonable(totals)
    data["charged_usd"] = format_usd(data.pop("charged"))
    data["deposited_usd"] = format_usd(data.pop("deposited"))
    return data


def _render(report: ReconcileReport, *, strict: bool, as_json: bool, as_csv: bool,
            dimensions: list[str]) -> None:
    failed = report.failed(strict=strict)
    if as_json:
        problems = [{"code": FINDINGS_CODE, "message": _verdict(report)}] if failed else None
        print_json(envelope(report_json(report), problems))
        return
    if as_csv:
        _write_csv(report)
        _print_findings(report, to_stderr=True)
    else:
        _print_totals(report, dimensions)
        _print_findings(report, to_stderr=False)
    say(_verdict(report))


def _verdict(report: ReconcileReport) -> str:
    if not report.findings:
        return "clean: no findings"
    return f"{report.errors} error finding(s), {report.warnings} warning(s)"


TOTAL_COLUMNS = ("calls", "captured", "charged USDC", "voided", "expired", "held", "refusals",
                 "deposited USDC")


def _totals_table(first: str, title: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for name in (first, *TOTAL_COLUMNS):
        table.add_column(name, overflow="fold")
    return table


def _totals_cells(totals: Totals) -> list[str]:
    refusals = "\n".join(f"{code} {n}" for code, n in totals.refusals.items()) or "0"
    return [str(totals.calls), str(totals.captured), format_usd(totals.charged),
            str(totals.voided), str(totals.expired), str(totals.held), refusals,
            format_usd(totals.deposited)]


def _print_totals(report: ReconcileReport, dimensions: list[str]) -> None:
    window = report.window
    summary = _totals_table("", f"{window.start:%Y-%m-%d %H:%M} .. {window.end:%Y-%m-%d %H:%M}"
                                f" UTC")
    summary.add_row("all", *_totals_cells(report.summary))
    out.print(summary)
    for dimension in dimensions:
        table = _totals_table(dimension, f"by {dimension}")
        for key, totals in report.totals[dimension].items():
            table.add_row(key, *_totals_cells(totals))
        out.print(table)


def _print_findings(report: ReconcileReport, *, to_stderr: bool) -> None:
    from rich.console import Console

    console = Console(stderr=to_stderr, markup=False, highlight=False, soft_wrap=True)
    for finding in report.findings:
        table = Table(title=f"{finding.severity}: {finding.name} ({finding.count}) - "
                            f"{finding.message}", title_justify="left", box=box.SIMPLE_HEAD,
                      pad_edge=False)
        for name in ("table", "key", "detail"):
            table.add_column(name, overflow="fold")
        for row in finding.rows:
            table.add_row(row.table, row.key, row.detail)
        if finding.count > len(finding.rows):
            table.add_row("...", f"{finding.count - len(finding.rows)} more", "")
        console.print(table)
    for skipped in report.skipped:
        say(f"[dim]not checked: {skipped}[/]")


def _write_csv(report: ReconcileReport) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["dimension", "key", "calls", "captured", "charged_usd", "voided",
                     "expired", "held", "refusals", "deposits", "deposited_usd"])
    rows = [("all", "", report.summary)] + [
        (dimension, key, totals) for dimension, keyed in report.totals.items()
        for key, totals in keyed.items()]
    for dimension, key, totals in rows:
        refusals = ";".join(f"{code}={n}" for code, n in totals.refusals.items())
        writer.writerow([dimension, key, totals.calls, totals.captured,
                         format_usd(totals.charged), totals.voided, totals.expired, totals.held,
                         refusals, totals.deposits, format_usd(totals.deposited)])


# --- events export ------------------------------------------------------------------------------


@events_app.command("export")
@handles_errors
def export(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option(
        "--since", help="Events at or after this date or ISO 8601 time (UTC unless it says "
                        "otherwise).")] = None,
    until: Annotated[str | None, typer.Option(
        "--until", help="Events before this date or time.")] = None,
    after: Annotated[int | None, typer.Option(
        "--after", min=0, metavar="ID", help="Events after this event id: resume where the "
                                             "last export ended.")] = None,
    out_file: Annotated[Path | None, typer.Option(
        "--out", help="Write to this file (atomically) instead of stdout.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Write the audit trail as JSON lines (schema_version 2) for time-series stores and SIEMs.

    One event per line in id order, streamed, with its seal and hash. With --json, --out is
    required and stdout carries the summary document. Resume with --after the last id shipped.
    Example: mcpbill events export --since 2026-11-27 --out e.jsonl
    """
    from mcpbill_cli.errors import InvalidInput
    from mcpbill_cli.events_export import atomic_text_file, export_events
    from mcpbill_cli.ledger.engine import reading
    from mcpbill_cli.reconcile.model import parse_moment

    if as_json and out_file is None:
        raise InvalidInput("with --json, stdout carries the summary: write the events to a "
                           "file with --out FILE")
    bounds = {"since": parse_moment(since, "--since") if since else None,
              "until": parse_moment(until, "--until") if until else None,
              "after": after}
    with reading(state(ctx).engine()) as conn:
        if out_file is None:
            result = export_events(conn, sys.stdout, **bounds)  # type: ignore[arg-type]
        else:
            with atomic_text_file(out_file) as fh:
                result = export_events(conn, fh, **bounds)  # type: ignore[arg-type]
    data = {"events": result.events, "first_id": result.first_id,
            "last_id": result.last_id, "out": str(out_file) if out_file else None}
    emit(data, as_json=as_json, human=lambda: say(
        f"exported {result.events} event(s)"
        + (f", ids {result.first_id}..{result.last_id}" if result.events else "")
        + (f" to {out_file}" if out_file else "")))
