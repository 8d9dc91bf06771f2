"""The `mcpbill` command: composes one Typer sub-app per command group, nothing more."""

from __future__ import annotations

import importlib
import itertools
import os
import sys
from contextlib import suppress
from typing import Annotated

import typer

from mcpbill_cli.__about__ import __version__
from mcpbill_cli.cli import complete, streams
from mcpbill_cli.cli.output import envelope, exit_code, printed_json, redacted
from mcpbill_cli.cli.state import State
from mcpbill_cli.config import ENV_DB_URL, ENV_HOME

# name -> (module under mcpbill_cli.cli, attribute, whether it is a group of commands).
# A run builds only the group it was asked for, so `token issue` never imports the wallet,
# pricing or x402 modules; `--help`, completion and tests get the whole tree.
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "init": ("init", "init", False),
    "status": ("status", "status", False),
    "config": ("config", "app", True),
    "db": ("db", "app", True),
    "keys": ("keys", "app", True),
    "wallet": ("wallet", "app", True),
    "tenant": ("tenant", "app", True),
    "token": ("token", "app", True),
    "revoke": ("revoke", "revoke", False),
    "revocations": ("revoke", "revocations_app", True),
    "pricing": ("pricing", "app", True),
    "receipt": ("receipt", "app", True),
    "refund": ("refund", "refund", False),
    "reconcile": ("reconcile", "reconcile", False),
    "events": ("reconcile", "events_app", True),
    "audit": ("audit", "app", True),
    "webhooks": ("webhooks", "app", True),
    "x402": ("x402", "app", True),
    "completion": ("completion", "completion", False),
    "demo": ("demo", "demo", False),
    "proxy": ("proxy", "proxy", False),
    "version": ("version", "version", False),
}
_ROOT_OPTIONS_WITH_VALUES = ("--home", "--db-url")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mcpbill {__version__}")
        raise typer.Exit()


def _given(value: str | None) -> str | None:
    """An empty ``--home`` or ``--db-url`` (``--home "$UNSET"`` in a script) is refused, not
    taken for the default: it would act on the default home's ledger instead."""
    if value is not None and not value.strip():
        raise typer.BadParameter("is empty; leave the option out for the default")
    return value


def root(
    ctx: typer.Context,
    home: Annotated[str | None, typer.Option(
        "--home", envvar=ENV_HOME, callback=_given,
        help="mcpbill home (config, keys, pricing, SQLite ledger).",
        show_default="the platform config dir, e.g. ~/.config/mcpbill")] = None,
    db_url: Annotated[str | None, typer.Option(
        "--db-url", envvar=ENV_DB_URL, callback=_given, show_default="sqlite:///<home>/ledger.db",
        help="Ledger database URL, e.g. postgresql+psycopg://user@host/db.")] = None,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Sell MCP tool calls to AI agents per call, in USDC: fund wallets, mint spend-capped
    credit tokens, price tools, reconcile the ledger."""
    state = State(home, db_url)
    ctx.obj = state
    ctx.call_on_close(state.close)


def build_app(names: list[str] | None = None) -> typer.Typer:
    """The CLI with every command group, or only ``names`` (what one run needs)."""
    app = typer.Typer(name="mcpbill", no_args_is_help=True, add_completion=False,
                      pretty_exceptions_show_locals=False, rich_markup_mode="rich",
                      context_settings={"help_option_names": ["-h", "--help"]})
    app.callback()(root)
    for name, (module, attribute, group) in COMMANDS.items():
        if names is not None and name not in names:
            continue
        target = getattr(importlib.import_module(f"mcpbill_cli.cli.{module}"), attribute)
        if group:
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)
    return app


_FULL: typer.Typer | None = None


def __getattr__(name: str) -> typer.Typer:
    """``from mcpbill_cli.cli import app``: the whole CLI, built on first use."""
    global _FULL
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _FULL is None:
        _FULL = build_app()
    return _FULL


def _command_name(argv: list[str]) -> str | None:
    """The command group a command line asks for, skipping the root options."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in _ROOT_OPTIONS_WITH_VALUES:
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def _app_for(argv: list[str]) -> typer.Typer:
    name = _command_name(argv)
    if complete.completing():
        complete.register_shells()
        return build_app()
    if name in COMMANDS:
        return build_app([name])
    return build_app()


# The exit status of a run whose reader closed stdout (`mcpbill token list | head -1`): success,
# as when the reader happens to leave after the last line, so `set -o pipefail` scripts see the
# same status whichever came first.
CLOSED_PIPE_EXIT = 0


def main() -> None:
    """Console entry point: a run whose reader closed stdout ends quietly, with status 0; one
    whose stdout cannot be written fails with a code (streams.py)."""
    stdout_at_start = _stdout_stat()
    streams.prepare()
    try:
        _main()
    except BrokenPipeError:
        _exit_on_closed_pipe()
    except OSError as exc:  # what Typer prints itself (--help) on a stdout that fails
        if exc.filename not in (None, "<stdout>"):
            raise
        sys.exit(streams.settle(streams.unwritable(exc)))
    except SystemExit as done:
        if _click_saw_closed_pipe() or _rich_saw_closed_pipe(stdout_at_start):
            _exit_on_closed_pipe()
        sys.exit(streams.settle(done.code))


def _stdout_stat() -> os.stat_result | None:
    try:
        return os.fstat(1)
    except OSError:
        return None


def _rich_saw_closed_pipe(at_start: os.stat_result | None) -> bool:
    """Rich answers a broken pipe by pointing stdout at /dev/null, then exit 1."""
    now, null = _stdout_stat(), os.stat(os.devnull)
    return (at_start is not None and now is not None and os.path.samestat(now, null)
            and not os.path.samestat(at_start, null))


def _click_saw_closed_pipe() -> bool:
    """Click answers a broken pipe by wrapping stdout to silence it, then exit 1."""
    from typer._click.utils import PacifyFlushWrapper

    return isinstance(sys.stdout, PacifyFlushWrapper)


def _exit_on_closed_pipe() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush has nowhere to fail and
    prints no "Exception ignored"."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.__stdout__.fileno() if sys.__stdout__ else 1)
    os.close(devnull)
    sys.exit(CLOSED_PIPE_EXIT)


def _json_requested(argv: list[str]) -> bool:
    """``--json``, or ``--output json`` in any of its spellings."""
    return "--json" in argv or any(
        word in ("--output=json", "-ojson") or (word in ("--output", "-o") and after == "json")
        for word, after in itertools.pairwise([*argv, ""]))


def _main() -> None:
    """Run the command line. With ``--json``, usage errors also come out as one JSON document;
    on a terminal they are Typer's box, off one Click's plain lines. Either way the message is
    redacted: it quotes the command line, which may hold a token."""
    app = _app_for(sys.argv[1:])
    as_json = _json_requested(sys.argv[1:])
    from typer._click.exceptions import ClickException, NoArgsIsHelpError

    try:
        result = app(prog_name="mcpbill", standalone_mode=False)
    except typer.Abort:
        if sys.stderr.isatty() and not as_json:
            from typer import rich_utils

            rich_utils.rich_abort_error()
        sys.exit(1)
    except NoArgsIsHelpError:
        sys.exit(exit_code("USAGE_ERROR"))  # Typer printed the help
    except ClickException as exc:
        exc.message = redacted(exc.message)
        if as_json and printed_json(envelope(None, [{
                "code": "USAGE_ERROR", "message": redacted(exc.format_message())}])):
            sys.exit(exit_code("USAGE_ERROR"))
        with suppress(OSError):  # a closed or full stderr: the exit status still tells
            if sys.stderr.isatty():
                from typer import rich_utils

                rich_utils.rich_format_error(exc)
            else:  # a log: Click's plain lines, not a box wrapped at 80 columns
                exc.show()
        sys.exit(exc.exit_code)
    sys.exit(result if isinstance(result, int) else 0)
