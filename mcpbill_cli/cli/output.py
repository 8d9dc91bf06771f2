"""How the CLI speaks: data on stdout, talk on stderr, one JSON envelope with ``--json``.

Every refusal is a BillingError; its ``code`` maps to the exit status here and only here.
The table is copied into the README ("Exit codes"); a test keeps the two in step.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import functools
import inspect
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import PurePath
from typing import IO, Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer
from typer._click.exceptions import ClickException

from mcpbill_cli.clock import rfc3339, rfc3339_text
from mcpbill_cli.errors import (
    BillingError,
    FileUnavailable,
    InternalError,
    Interrupted,
    LedgerUnavailable,
)

# 2: one data contract (snake_case, `*_usd`, RFC 3339 `Z` times); 1 had camelCase fields in
# pricing, receipt and x402 data, `exp` in `token issue` and times in several forms.
SCHEMA_VERSION = 2
ENV_DEBUG = "MCPBILL_DEBUG"

EXIT_CODES: dict[str, int] = {
    "USAGE_ERROR": 2,
    "INVALID_INPUT": 3,
    "NO_CHECKPOINT": 3,
    "NOT_FOUND": 4,
    "INSUFFICIENT_FUNDS": 5,
    "BUDGET_EXCEEDED": 5,
    "REFUND_EXCEEDS_CHARGE": 5,
    "INVALID_CREDIT_TOKEN": 6,
    "INVALID_RECEIPT": 6,
    "TOKEN_REVOKED": 6,
    "SCOPE_DENIED": 6,
    "ALREADY_EXISTS": 7,
    "IDEMPOTENCY_CONFLICT": 7,
    "HOLD_NOT_ACTIVE": 7,
    "CALL_FAILED": 7,
    "CALL_NOT_CAPTURED": 7,
    "DEPOSIT_CLAIMED": 7,
    "X402_ALREADY_PAID": 7,
    "CALL_IN_PROGRESS": 7,
    "DUPLICATE_CALL": 7,
    "LEDGER_UNAVAILABLE": 8,
    "LEDGER_FULL": 8,
    "NOT_INITIALIZED": 9,
    "SCHEMA_OUTDATED": 9,
    "AUDIT_CHAIN_BROKEN": 9,
    "CONFIG_INVALID": 10,
    "PRICING_INVALID": 10,
    "PRICING_VERSION_REUSED": 10,
    "PRICE_UNKNOWN": 10,
    "UNKNOWN_CHAIN": 10,
    "NO_RPC_URL": 10,
    "NO_DEPOSIT_ADDRESS": 10,
    "DEMO_ONLY": 11,
    "STATELESS_VERIFIER": 11,
    "TX_NOT_FOUND": 12,
    "TX_PENDING": 13,
    "TX_REVERTED": 14,
    "NOT_USDC": 15,
    "WRONG_RECIPIENT": 16,
    "RPC_UNAVAILABLE": 17,
    "CHAIN_INCONSISTENT": 17,
    "WRONG_CHAIN": 18,
    "WRONG_PASSWORD": 19,
    "RECONCILE_FINDINGS": 20,
    "X402_BAD_CHALLENGE": 21,
    "X402_NO_ACCEPTABLE_OPTION": 22,
    "X402_OVER_MAXIMUM": 23,
    "X402_SETTLEMENT_FAILED": 24,
    "CONFIRMATION_REQUIRED": 25,
    "X402_HTTP_ERROR": 26,
    "INTERNAL_ERROR": 1,
    "KEYRING_CORRUPT": 10,
    "FILE_UNAVAILABLE": 3,
    "NO_TERMINAL": 3,
    "X402_UNREACHABLE": 17,
    "X402_PAYMENT_INVALID": 27,
    "X402_NONCE_USED": 7,
    "X402_INSUFFICIENT_FUNDS": 5,
    "X402_FACILITATOR_UNAVAILABLE": 17,
    "UPSTREAM_UNAVAILABLE": 28,
    "UPSTREAM_TIMEOUT": 28,
    "PROXY_BUSY": 29,
    "PROXY_SESSIONS_FULL": 29,
    "REQUEST_TOO_LARGE": 29,
    "RESPONSE_TOO_LARGE": 29,
    "RATE_LIMITED": 30,
    "WEBHOOK_FAILED": 31,
    "INTERRUPTED": 130,
}
GENERIC_FAILURE = 1

class _LazyConsole:
    """A Rich console made on first use: most runs print a line or nothing, and importing
    rich.console costs start-up time on every command.

    Off a terminal (a pipe, a file, a CI log) it never hard-wraps: a long line stays one line.
    A ``best_effort`` console (stderr's) drops what it cannot write: talk that a closed or full
    stderr cannot take must not turn a command that was done into a failure.
    """

    def __init__(self, *, best_effort: bool = False, **options: Any) -> None:
        self._options = options
        self._best_effort = best_effort
        self._console: Any = None

    def get(self) -> Any:
        """The Rich console itself, for Rich objects that take one (a Progress, a Live)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
            self._console.soft_wrap = self._console.soft_wrap or not self._console.is_terminal
            if self._console.width < 1:  # COLUMNS=0: Rich would print nothing at all
                import shutil

                self._console.width = shutil.get_terminal_size().columns  # skips COLUMNS<=0
        return self._console

    def print(self, *objects: Any, **options: Any) -> None:
        try:
            self.get().print(*objects, **options)
        except OSError:
            if not self._best_effort:
                raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


out: Any = _LazyConsole(markup=False, highlight=False, soft_wrap=True)
err: Any = _LazyConsole(stderr=True, highlight=False, best_effort=True)


def is_terminal(stream: IO[str]) -> bool:
    """Whether a person reads ``stream``: draw tables and progress bars only then."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


# --- listings -----------------------------------------------------------------------------------


class Output(enum.StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


OutputOption = Annotated[Output | None, typer.Option(
    "--output", "-o", show_default="table",
    help="table (a table on a terminal; tab-separated lines with a header in a pipe), json (as "
         "--json) or csv (a header row, then one record per line).")]


def output_format(output: Output | None, as_json: bool) -> Output:
    """The format asked for: ``--json`` is ``--output json``."""
    if as_json and output not in (None, Output.json):
        from mcpbill_cli.errors import InvalidInput

        raise InvalidInput(f"--json means --output json, not --output {output}: give one")
    return Output.json if as_json else output or Output.table


@dataclasses.dataclass(frozen=True)
class Column:
    """A column of a listing: its header and what it shows of an item. An ``ident`` column
    (a jti, receipt id, kid, address, tx hash) is never cut nor wrapped."""

    header: str
    value: Callable[[Any], Any]
    ident: bool = False

    def cell(self, item: Any) -> str:
        value = self.value(item)
        if value is None:
            return "-"
        if isinstance(value, list | tuple):
            return ", ".join(shown(str(v)) for v in value)
        return shown(str(value))


def shown(text: str) -> str:
    """``text`` with each character a terminal would act on (an escape, a bell, a carriage
    return; anything not printable but a tab or a newline) written as its Python escape, so a
    name kept before names were checked lists as data and never drives the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\t\n" else repr(c)[1:-1] for c in text)


def usd_column(header: str, attribute: str) -> Column:
    """A column of an item's micro-USDC ``attribute``, shown in USDC."""
    from mcpbill_cli.money import format_usd

    return Column(header, lambda item: format_usd(getattr(item, attribute)))


def emit_listing(items: Sequence[Any], columns: Sequence[Column], *, output: Output,
                 records: Sequence[Mapping[str, Any]], data: Any = None,
                 title: str | None = None) -> None:
    """Print ``items`` as a table (tab-separated lines off a terminal), their ``records`` (one
    JSON object per item) as CSV, or the JSON envelope of ``data`` (the records unless given).
    """
    with printing():
        if output is Output.json:
            print_json(envelope(records if data is None else data))
        elif output is Output.csv:
            write_csv(records)
        else:
            show_listing(items, columns, title=title)


def show_listing(items: Sequence[Any], columns: Sequence[Column], *, title: str | None = None,
                 to_stderr: bool = False) -> None:
    """A table for a person at a terminal; tab-separated lines for a pipe, a file or a log."""
    if is_terminal(sys.stderr if to_stderr else sys.stdout):
        print_table(items, columns, title=title, to_stderr=to_stderr)
    else:
        write_plain(items, columns, to_stderr=to_stderr)


def print_table(items: Sequence[Any], columns: Sequence[Column], *,
                title: str | None = None, to_stderr: bool = False) -> None:
    """A Rich table when it fits the terminal; else each item as "field value" lines, as
    psql's expanded display does: a squeezed table would cut or fold the IDs."""
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    console = (err if to_stderr else out).get()
    table = Table(title=None if title is None else Text(title), title_justify="left")
    for column in columns:
        table.add_column(column.header, no_wrap=column.ident, overflow="ignore")
    for item in items:  # Text: a cell's [brackets] are data, never markup
        table.add_row(*(Text(column.cell(item)) for column in columns))
    unbounded = console.options.update_width(sys.maxsize)
    if Measurement.get(console, unbounded, table).maximum <= console.width:
        console.print(table)
        return
    if title:
        console.print(title, markup=False)
    for n, item in enumerate(items):
        if n or title:
            console.print()
        print_fields({column.header: column.cell(item) for column in columns},
                     to_stderr=to_stderr)


def print_fields(fields: Mapping[str, str], *, to_stderr: bool = False) -> None:
    """One field a line: aligned on a terminal, ``name<TAB>value`` elsewhere; never wrapped."""
    stream = sys.stderr if to_stderr else sys.stdout
    if not is_terminal(stream):
        stream.write("".join(f"{k}\t{_one_line(shown(v))}\n" for k, v in fields.items()))
        return
    width = max((len(name) for name in fields), default=0)
    for name, value in fields.items():
        (err if to_stderr else out).print(f"{name:<{width}}  {shown(value)}", markup=False)


def write_plain(items: Sequence[Any], columns: Sequence[Column], *,
                to_stderr: bool = False) -> None:
    """A header line, then one item per line, fields separated by tabs: for grep, cut, awk."""
    lines = [[column.header for column in columns]]
    lines += [[column.cell(item) for column in columns] for item in items]
    text = "".join("\t".join(_one_line(c) for c in line) + "\n" for line in lines)
    (sys.stderr if to_stderr else sys.stdout).write(text)


def _one_line(text: str) -> str:
    return " ".join(text.split()) if any(c in text for c in "\t\r\n") else text


def write_csv(records: Sequence[Mapping[str, Any]]) -> None:
    """RFC 4180 CSV of the records' JSON fields: a header row, CRLF line ends, nested values as
    JSON, null as an empty field, booleans as true/false."""
    fields = list(dict.fromkeys(name for record in records for name in record))
    if not fields:  # no records: no fields to name
        return
    writer = csv.writer(sys.stdout, lineterminator="\r\n")
    writer.writerow(fields)
    for record in records:
        writer.writerow([_csv_value(to_jsonable(record.get(name))) for name in fields])


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


@contextmanager
def progress_bar(label: str, *, unit: str, shown: bool = True
                 ) -> Iterator[Callable[[int, int | None], None]]:
    """``update(done, total)`` drawing a transient Rich progress bar on stderr, only when
    ``shown`` and stderr is a terminal: stdout stays data, and a log gets no bar. Without a
    ``unit`` the bar counts nothing and shows the time taken."""
    if not (shown and is_terminal(sys.stderr)):
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    counted = (MofNCompleteColumn(), TextColumn(unit)) if unit else (TimeElapsedColumn(),)
    columns = (TextColumn(label), BarColumn(), *counted)
    # stdout stays the data's own: Rich would otherwise route it through the bar's console.
    with Progress(*columns, console=err.get(), transient=True, redirect_stdout=False) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON document {schema_version, status, data, "
                                      "errors} on stdout, on failure too.")
]

P = ParamSpec("P")
R = TypeVar("R")


def exit_code(code: str) -> int:
    return EXIT_CODES.get(code, GENERIC_FAILURE)


def envelope(data: Any = None, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "status": "error" if errors else "ok",
            "data": to_jsonable(data), "errors": errors or []}


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, PurePath):
        return str(value)
    return value


def timestamp(value: datetime | str | None) -> str | None:
    """A time in the CLI's one form (RFC 3339, UTC, ``Z``, microseconds), from a datetime or
    from ISO 8601 text kept elsewhere (the key ring, a signed claim)."""
    if value is None:
        return None
    return rfc3339(value) if isinstance(value, datetime) else rfc3339_text(value)


_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def snake_case(name: str) -> str:
    """``pricingVersion`` -> ``pricing_version``."""
    return _CAMEL_HUMP.sub("_", name).lower()


def wire_to_cli(value: Any) -> Any:
    """A wire object (signed receipt claims, ``_meta``, an x402 exchange: camelCase for agents)
    in the CLI's contract: snake_case keys at every depth, times (``timestamp``, ``*_at``) in
    RFC 3339 ``Z`` form. The signed originals stay verbatim in the ``jws`` strings."""
    if isinstance(value, dict):
        converted = {snake_case(str(k)): wire_to_cli(v) for k, v in value.items()}
        for key, item in converted.items():
            if (key == "timestamp" or key.endswith("_at")) and isinstance(item, str):
                converted[key] = rfc3339_text(item)
        return converted
    if isinstance(value, list | tuple):
        return [wire_to_cli(v) for v in value]
    return to_jsonable(value)


def receipt_data(claims: dict[str, Any]) -> dict[str, Any]:
    """A receipt's signed claims as CLI data: :func:`wire_to_cli`, with the micro-USDC
    ``amount`` string (x402's atomic units) as the integer ``amount_micro``."""
    data: dict[str, Any] = wire_to_cli(claims)
    if "amount" in data:
        data["amount_micro"] = int(data.pop("amount"))
    return data


def print_json(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=False) + "\n")


def printed_json(document: dict[str, Any]) -> bool:
    """Print ``document`` on stdout and flush it; False when stdout cannot take it (closed, a
    full disk, its reader gone)."""
    try:
        print_json(document)
        sys.stdout.flush()
    except OSError:
        return False
    return True


def emit(data: Any, *, as_json: bool, human: Callable[[], None],
         lost: str | None = None) -> None:
    """Print ``data`` as the JSON envelope, or call ``human`` to render it for a person; a
    ``human`` prints the result on stdout before any talk on stderr.

    ``lost`` is for output nothing else can give again (a credit token, a signing secret): what
    was done and how to undo it. A reader that closed stdout hears it on stderr, and the run
    still ends as a closed pipe does (status 0); a stdout that cannot be written (closed, a
    full disk) fails the command with FILE_UNAVAILABLE, whose message carries it. Output a
    reader drops unread after it was written is past telling."""
    with printing(lost):
        if as_json:
            print_json(envelope(data))
        else:
            human()


@contextmanager
def printing(lost: str | None = None) -> Iterator[None]:
    """Print a result in the block, then flush it, so that a stdout that fails shows here and
    not in the interpreter's last flush: as FILE_UNAVAILABLE naming stdout, or as a closed
    pipe (see :func:`emit` for ``lost``)."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        if lost is not None:
            say(f"[yellow]stdout was closed[/]: {lost}")
        raise
    except OSError as exc:
        reason = f"cannot write to stdout: {exc.strerror or exc}"
        raise FileUnavailable(reason if lost is None else f"{reason}; {lost}",
                              path="<stdout>") from None


def fail(exc: BillingError, *, as_json: bool) -> NoReturn:
    """End the command with ``exc``'s exit status, told as the JSON envelope with ``--json``
    (on stderr when stdout cannot take it: the failure may be stdout's own)."""
    if not (as_json and printed_json(envelope(None, [redacted(exc.to_dict())]))):
        tell(exc)
    raise typer.Exit(exit_code(exc.code))


def tell(exc: BillingError) -> None:
    """Say ``exc`` on stderr, as ``error CODE: message``."""
    err.print(f"[bold red]error[/] [dim]{exc.code}[/]: ", end="")
    err.print(exc.message, markup=False)


def redacted(value: Any) -> Any:
    """``value`` with every string in it passed through the one redaction function: an
    error's details quote input as its message does."""
    from mcpbill_cli.redaction import redact

    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


# Parameters that name something. An empty or blank one is refused before the command runs,
# whatever the command: `--tenant ''` must never credit a tenant named "".
NAME_PARAMETERS = ("tenant", "agent", "tool", "jti", "kid", "key", "parent", "tokens", "scope",
                   "request_id", "idempotency_key", "chains")


# Parameters naming what the ledger keeps, and what they name: beyond not blank, each is held
# to the rule of mcpbill_cli.names (printable, no outer spaces, fits its column), so that
# `--tenant 'acme '` is not a second tenant and `token list --agent` reads what issue wrote.
KEPT_NAMES = {"tenant": "tenant", "agent": "agent", "aud": "audience"}


def refuse_bad_names(arguments: Mapping[str, Any]) -> None:
    """Raise INVALID_INPUT for the first name parameter given as empty or whitespace, then for
    the first kept name (:data:`KEPT_NAMES`) the ledger could not keep as it is."""
    from mcpbill_cli.errors import InvalidInput
    from mcpbill_cli.names import require_name

    for name in NAME_PARAMETERS:
        value = arguments.get(name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and not item.strip():
                label = name.rstrip("s") if name in ("tokens", "chains") else name
                raise InvalidInput(f"the {label.replace('_', ' ')} given is empty: name one "
                                   "(blank is not a name)", field=name)
    for name, what in KEPT_NAMES.items():
        value = arguments.get(name)
        if isinstance(value, str):
            require_name(value, what)


def handles_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Render any BillingError the command raises, as JSON when the command got ``--json``;
    Ctrl-C is INTERRUPTED; anything else that escapes is the last line of defence's
    (:func:`unexpected`). Blank and bad names are refused first (:func:`refuse_bad_names`)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            refuse_bad_names(kwargs)
            return fn(*args, **kwargs)
        except BillingError as exc:
            fail(exc, as_json=_wants_json(kwargs))
        except (typer.Exit, typer.Abort, BrokenPipeError, ClickException):
            raise  # an exit status, a usage error or a closed pipe: not failures to recode
        except KeyboardInterrupt:  # exit 130 as Typer's, but told (one document with --json)
            fail(Interrupted("interrupted (Ctrl-C): what it had done by then stands"),
                 as_json=_wants_json(kwargs))
        except Exception as exc:  # noqa: BLE001 - the last line of defence, see unexpected()
            fail(unexpected(exc), as_json=_wants_json(kwargs))

    wrapper.__doc__ = reflowed(fn.__doc__)
    return wrapper


def _wants_json(kwargs: Mapping[str, Any]) -> bool:
    return bool(kwargs.get("as_json")) or kwargs.get("output") == Output.json


def unexpected(exc: Exception) -> BillingError:
    """A coded error for an exception nothing anticipated, so a script still gets an exit code
    and one JSON document: a file the OS refused names its path (FILE_UNAVAILABLE), a ledger
    the driver cannot read is LEDGER_UNAVAILABLE, the rest is INTERNAL_ERROR (a bug). The
    traceback goes to stderr only with ``MCPBILL_DEBUG=1``: it can hold paths and arguments."""
    if os.environ.get(ENV_DEBUG) == "1":
        traceback.print_exception(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return FileUnavailable(f"cannot use {exc.filename}: {exc.strerror or exc}",
                               path=str(exc.filename))
    if _is_ledger_failure(exc):
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return LedgerUnavailable(f"the ledger cannot be read: {reason}; restore it from a "
                                 "backup, or check MCPBILL_DB_URL or --db-url")
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    return InternalError(f"unexpected {type(exc).__name__}: {first_line} (a bug: please report "
                         f"it; {ENV_DEBUG}=1 shows the traceback)")


def _is_ledger_failure(exc: Exception) -> bool:
    """A database error SQLAlchemy raised as it is (a corrupt SQLite page, a lost server); not
    an integrity or programming error, which would be a bug."""
    if "sqlalchemy" not in sys.modules:
        return False
    from sqlalchemy.exc import DatabaseError, InterfaceError, OperationalError

    return isinstance(exc, OperationalError | InterfaceError) or type(exc) is DatabaseError


def reflowed(doc: str | None) -> str | None:
    """A docstring with each paragraph on one line: Typer's help keeps a docstring's line
    breaks, and a terminal narrower than the source would break those lines again."""
    if not doc:
        return doc
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def say(message: str) -> None:
    """Talk to the person at the terminal (stderr), never mixed into data on stdout.

    Off a terminal the line is written as plain text, markup removed and never wrapped, without
    making a Rich console: importing rich.console is a sixth of what `token issue` may spend
    beyond its import floor (bench/cli_startup.py). Best effort: a closed or full stderr drops
    the line, and the command's outcome stands."""
    if is_terminal(sys.stderr):
        err.print(message)
        return
    if "[" in message:
        from rich.markup import render

        message = render(message, emoji=False).plain
    if sys.stderr is not None:  # None: started without one, outside `mcpbill` (streams.py)
        with suppress(OSError):
            sys.stderr.write(message + "\n")


def with_usd(value: Any, *amount_fields: str) -> dict[str, Any]:
    """A result as a JSON object whose micro-USDC fields become ``<name>_usd`` decimal strings."""
    from mcpbill_cli.money import format_usd

    data: dict[str, Any] = to_jsonable(value)
    for name in amount_fields:
        data[f"{name}_usd"] = format_usd(data.pop(name))
    return data
