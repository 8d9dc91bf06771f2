"""`mcpbill reconcile` and `mcpbill events export`: parse, call the core, render.

Registered by ``cli/__init__.py``: ``app.command("reconcile")(reconcile.reconcile)`` and
``app.add_typer(reconcile.events_app, name="events")``.
"""

from __future__ import annotations

import csv
import enum
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer

from mcpbill_cli.cli import complete
from mcpbill_cli.cli.output import (
    EXIT_CODES,
    Column,
    JsonOption,
    Output,
    OutputOption,
    emit,
    envelope,
    err,
    handles_errors,
    is_terminal,
    output_format,
    print_json,
    printing,
    progress_bar,
    say,
    show_listing,
    to_jsonable,
)
from mcpbill_cli.cli.state import State, state
from mcpbill_cli.clock import rfc3339
from mcpbill_cli.money import format_usd
from mcpbill_cli.wallet.chains import ENV_RPC_URL

if TYPE_CHECKING:
    from mcpbill_cli.reconcile import ChainReader, Finding, ReconcileReport, Totals

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
                      "says): --output csv.")] = False,
    output: OutputOption = None,
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

    chosen = Output.csv if as_csv and output is None else output_format(output, as_json)
    st = state(ctx)
    now = st.now()
    window = Window.parse(day=day, since=since, until=until, now=now)
    st.require_tenant(tenant)
    options = ReconcileOptions(
        window=window, filters=Filters(tenant, agent, tool), chain=chain.value,
        verify_receipts=verify_receipts, keys_dir=st.settings.keys_dir,
        onchain=_chain_reader(st, rpc_url) if onchain else None, leeway=st.settings.leeway,
        jobs=jobs or os.cpu_count() or 1, max_rows=max_rows, ledger_wide=not window_only,
        full_history=full_history, snapshots=not no_snapshot, now=now)
    if chosen is Output.table:
        say(f"reconciling {rfc3339(window.start)} .. {rfc3339(window.end)}")
    with progress_bar("reconciling", unit="", shown=chosen is Output.table):
        report = run_reconcile(st.engine(), options)
    with printing():
        _render(report, strict=strict, output=chosen,
                dimensions=[d.value for d in by] if by else ["tenant", "tool"],
                max_rows=max_rows)
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
    data["refunded_usd"] = format_usd(data.pop("refunded"))
    return data


def _render(report: ReconcileReport, *, strict: bool, output: Output,
            dimensions: list[str], max_rows: int) -> None:
    failed = report.failed(strict=strict)
    if output is Output.json:
        problems = [{"code": FINDINGS_CODE, "message": _verdict(report)}] if failed else None
        print_json(envelope(report_json(report), problems))
        return
    if output is Output.csv:
        _write_csv(report)
        _print_findings(report, to_stderr=True, max_rows=max_rows)
    else:
        _print_totals(report, dimensions)
        _print_findings(report, to_stderr=False, max_rows=max_rows)
    say(_verdict(report))


def _verdict(report: ReconcileReport) -> str:
    if not report.findings:
        return "clean: no findings"
    return f"{report.errors} error finding(s), {report.warnings} warning(s)"


TOTAL_COLUMNS = (
    Column("calls", lambda t: t.calls), Column("captured", lambda t: t.captured),
    Column("charged USDC", lambda t: format_usd(t.charged)), Column("voided", lambda t: t.voided),
    Column("expired", lambda t: t.expired), Column("held", lambda t: t.held),
    Column("refusals", lambda t: "\n".join(f"{code} {n}" for code, n in t.refusals.items())
           or "0"),
    Column("deposited USDC", lambda t: format_usd(t.deposited)),
    Column("refunded USDC", lambda t: format_usd(t.refunded)),
    Column("net USDC", lambda t: format_usd(t.net)),
)
FINDING_COLUMNS = (Column("table", lambda r: r.table), Column("key", lambda r: r.key, ident=True),
                   Column("detail", lambda r: r.detail))


def _keyed(header: str, at: int = 0) -> tuple[Column, ...]:
    """Columns of a tuple item: the key at ``at`` (a tenant, agent, tool or jti: never cut),
    then the totals after it."""
    return (Column(header, lambda item: item[at], ident=True),
            *(_of_totals(column, at + 1) for column in TOTAL_COLUMNS))


def _of_totals(column: Column, at: int) -> Column:
    return Column(column.header, lambda item: column.value(item[at]))


def _print_totals(report: ReconcileReport, dimensions: list[str]) -> None:
    """A table per dimension on a terminal; else one line per key, its dimension first."""
    window = report.window
    if not is_terminal(sys.stdout):
        rows = [("all", "", report.summary)] + [
            (dimension, key, totals) for dimension in dimensions
            for key, totals in report.totals[dimension].items()]
        columns = (Column("dimension", lambda row: row[0]), *_keyed("key", at=1))
        show_listing(rows, columns)
        return
    show_listing([("all", report.summary)], _keyed(""),
                 title=f"{window.start:%Y-%m-%d %H:%M} .. {window.end:%Y-%m-%d %H:%M} UTC")
    for dimension in dimensions:
        show_listing(list(report.totals[dimension].items()), _keyed(dimension),
                     title=f"by {dimension}")


def _print_findings(report: ReconcileReport, *, to_stderr: bool, max_rows: int) -> None:
    for finding in report.findings:
        title = _finding_title(finding) + _more(finding, max_rows)
        if to_stderr or not is_terminal(sys.stdout):
            _finding_lines(finding, title, to_stderr=to_stderr)
        else:
            show_listing(finding.rows, FINDING_COLUMNS, title=title)
    for skipped in report.skipped:
        say(f"[dim]not checked: {skipped}[/]")


def _finding_title(finding: Finding) -> str:
    return f"{finding.severity}: {finding.name} ({finding.count}) - {finding.message}"


def _more(finding: Finding, max_rows: int) -> str:
    """What --max-rows left out; nothing for a finding that lists fewer rows than it may (one
    summed up in a row, as ``audit_unsealed``'s oldest event of its count)."""
    hidden = finding.count - len(finding.rows)
    cut = hidden > 0 and len(finding.rows) >= max_rows
    return f"; {hidden} more not listed (--max-rows)" if cut else ""


def _finding_lines(finding: Finding, title: str, *, to_stderr: bool) -> None:
    """A finding off a terminal: its title on stderr, then one tab-separated line per row, the
    finding's name first, so ``grep`` finds every row of one finding."""
    err.print(title, markup=False, soft_wrap=True)
    stream = sys.stderr if to_stderr else sys.stdout
    for row in finding.rows:
        stream.write("\t".join(" ".join(cell.split()) for cell in (
            finding.name, row.table, row.key, row.detail)) + "\n")


def _write_csv(report: ReconcileReport) -> None:
    """The totals as CSV, as every listing's (README, Output): CRLF line ends, and the
    ``refusals`` object as JSON (``{"BUDGET_EXCEEDED": 1}``, ``{}`` for none)."""
    writer = csv.writer(sys.stdout, lineterminator="\r\n")
    writer.writerow(["dimension", "key", "calls", "captured", "charged_usd", "voided",
                     "expired", "held", "refusals", "deposits", "deposited_usd", "refunds",
                     "refunded_usd"])
    rows = [("all", "", report.summary)] + [
        (dimension, key, totals) for dimension, keyed in report.totals.items()
        for key, totals in keyed.items()]
    for dimension, key, totals in rows:
        refusals = json.dumps(dict(totals.refusals))
        writer.writerow([dimension, key, totals.calls, totals.captured,
                         format_usd(totals.charged), totals.voided, totals.expired, totals.held,
                         refusals, totals.deposits, format_usd(totals.deposited),
                         totals.refunds, format_usd(totals.refunded)])


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
        "--after", min=0, metavar="ID", help="Events after this sealed event: resume with the "
                                             "cursor the last export gave (0: from the "
                                             "start).")] = None,
    out_file: Annotated[Path | None, typer.Option(
        "--out", help="Write to this file (atomically) instead of stdout.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Write the audit trail as JSON lines (schema_version 2) for time-series stores and SIEMs.

    One event per line, streamed, with its seal and hash: the sealed events in seal order,
    then the unsealed ones. With --json, --out is required and stdout carries the summary
    document. Resume with --after the cursor it gives (the last sealed event written): an
    event committed late is in a later seal, so none is skipped.
    Example: mcpbill events export --since 2026-11-27 --out e.jsonl
    """
    from mcpbill_cli.errors import InvalidInput
    from mcpbill_cli.events_export import atomic_text_file, export_events
    from mcpbill_cli.ledger.engine import reading
    from mcpbill_cli.reconcile.model import parse_moment

    if as_json and out_file is None:
        raise InvalidInput("with --json, stdout carries the summary: write the events to a "
                           "file with --out FILE")
    start = parse_moment(since, "--since") if since else None
    end = parse_moment(until, "--until") if until else None
    if start is not None and end is not None and end <= start:
        raise InvalidInput(f"--until ({until}) is not after --since ({since}): no event "
                           "could be in that window", field="until")
    bounds = {"since": start, "until": end, "after": after}
    with reading(state(ctx).engine()) as conn, progress_bar(
            "exporting", unit="events", shown=not as_json) as progress:
        if out_file is None:
            sink: Any = _Counted(sys.stdout, progress)
            with printing():
                result = export_events(conn, sink, **bounds)  # type: ignore[arg-type]
        else:
            with atomic_text_file(out_file) as fh:
                sink = _Counted(fh, progress)
                result = export_events(conn, sink, **bounds)  # type: ignore[arg-type]
    data = {"events": result.events, "first_id": result.first_id,
            "last_id": result.last_id, "cursor": result.cursor,
            "out": str(out_file) if out_file else None}
    emit(data, as_json=as_json, human=lambda: say(
        f"exported {result.events} event(s)"
        + (f", ids {result.first_id}..{result.last_id}" if result.events else "")
        + (f" to {out_file}" if out_file else "")
        + (f"; resume with --after {result.cursor}" if result.cursor is not None else "")))


class _Counted:
    """A text stream that reports how many events (one ``write`` each) went through it."""

    def __init__(self, stream: IO[str], progress: Callable[[int, int | None], None]) -> None:
        self._stream, self._progress, self._count = stream, progress, 0

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        self._count += 1
        self._progress(self._count, None)
        return written
