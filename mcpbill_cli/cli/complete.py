"""Shell completion: Typer's bash, zsh and fish, and the values they offer (tenants, token ids,
agents, tool names, chains and key ids).

Each TAB runs ``mcpbill`` with ``_MCPBILL_COMPLETE`` set, and a provider here answers for the
option or argument being completed. A TAB must be quick and quiet, so a provider only reads what
already exists: the ledger opened read-only, ``pricing.toml`` and ``config.toml`` parsed without
validation. It creates no home and no ledger, and when any of them is missing, unreachable or
broken it offers nothing rather than an error. Nothing secret is offered: no token, no key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from typer._click.shell_completion import CompletionItem, add_completion_class, split_arg_string
from typer._completion_classes import BashComplete, FishComplete, ZshComplete

from mcpbill_cli.config import Settings, load_settings
from mcpbill_cli.errors import BillingError

COMPLETE_VAR = "_MCPBILL_COMPLETE"
# Seconds to wait for a PostgreSQL ledger before offering nothing.
CONNECT_TIMEOUT = 2
# What a provider may meet in a missing or broken home; each means "no suggestions".
_QUIET = (BillingError, OSError, ValueError, ImportError)
Candidates = list[tuple[str, str]]

# Plain SQL, the same on SQLite and PostgreSQL; each offers at most 200 values, matching :prefix.
_TENANTS = ("SELECT substr(id, 8), credits_posted - debits_posted - debits_pending FROM accounts "
            "WHERE kind = 'tenant' AND substr(id, 8, length(:prefix)) = :prefix ORDER BY id "
            "LIMIT 200")
_TOKENS = ("SELECT jti, tenant, agent FROM tokens WHERE substr(jti, 1, length(:prefix)) = :prefix "
           "ORDER BY issued_at DESC, jti LIMIT 200")
_ACTIVE_TOKENS = ("SELECT jti, tenant, agent FROM tokens WHERE revoked_at IS NULL "
                  "AND substr(jti, 1, length(:prefix)) = :prefix "
                  "ORDER BY issued_at DESC, jti LIMIT 200")
_AGENTS = ("SELECT DISTINCT agent FROM tokens WHERE substr(agent, 1, length(:prefix)) = :prefix "
           "ORDER BY agent LIMIT 200")


def completing() -> bool:
    """Whether this run answers a TAB rather than runs a command."""
    return bool(os.environ.get(COMPLETE_VAR))


def register_shells() -> None:
    """Make ``_MCPBILL_COMPLETE=complete_bash|complete_zsh|complete_fish`` answer.

    Typer registers its shells only for apps built with ``add_completion``, which would also add
    ``--install-completion`` (it edits the user's rc files); ``mcpbill completion`` replaces it.
    """
    for shell in (Bash, Zsh, Fish):
        add_completion_class(shell, shell.name)


# Bash hands the line up to the cursor to mcpbill, which splits it as the shell would: Typer's
# own script passes COMP_WORDS, which bash splits at COMP_WORDBREAKS, so a `:` or `=` inside a
# word (`--db-url sqlite:///...`) cut it in pieces. mapfile keeps each line one value, unglobbed;
# no value leaves COMPREPLY empty (not one empty value), so bash falls back to file names.
BASH_SCRIPT = r"""%(complete_func)s() {
    mapfile -t COMPREPLY < <(env COMP_LINE="${COMP_LINE:0:COMP_POINT}" \
        COMP_WORDBREAKS="$COMP_WORDBREAKS" %(autocomplete_var)s=complete_bash "$1")
    [[ -n "${COMPREPLY[*]}" ]] || COMPREPLY=()
    return 0
}

complete -o default -F %(complete_func)s %(prog_name)s"""


# Bash inserts a value as it is: escape what the shell would read otherwise (spaces, quotes, &).
_BASH_SPECIAL = re.compile(r"([^\w@%+=:,./-])")


class Bash(BashComplete):
    source_template = BASH_SCRIPT

    def get_completion_args(self) -> tuple[list[str], str]:
        return split_line(os.environ.get("COMP_LINE", ""))

    def complete(self) -> str:
        """Each value from where bash's word starts: after the last ``=`` or ``:`` (or other
        COMP_WORDBREAKS) of the word being completed, as bash replaces only that part."""
        args, incomplete = self.get_completion_args()
        breaks = set(os.environ.get("COMP_WORDBREAKS", "=:")) - set(" \t\n\"'")
        start = max((i + 1 for i, char in enumerate(incomplete) if char in breaks), default=0)
        return "\n".join(_BASH_SPECIAL.sub(r"\\\1", item.value[start:])
                         for item in _joined(self.get_completions, args, incomplete))


class Zsh(ZshComplete):
    def get_completion_args(self) -> tuple[list[str], str]:
        return split_line(os.environ.get("_TYPER_COMPLETE_ARGS", ""))

    def get_completions(self, args: list[str], incomplete: str) -> list[CompletionItem]:
        return _joined(super().get_completions, args, incomplete)

    def format_completion(self, item: CompletionItem) -> str:
        """Typer doubles a ``'`` inside the single-quoted ``_arguments`` spec, which zsh reads
        as nothing (``o'brien`` came out ``obrien``): close, escape and reopen the quote."""
        return _one_line(super().format_completion(item)).replace("''", "'\\''")


class Fish(FishComplete):
    def get_completion_args(self) -> tuple[list[str], str]:
        return split_line(os.environ.get("_TYPER_COMPLETE_ARGS", ""))

    def get_completions(self, args: list[str], incomplete: str) -> list[CompletionItem]:
        return _joined(super().get_completions, args, incomplete)

    def format_completion(self, item: CompletionItem) -> str:
        return _one_line(super().format_completion(item))


def _one_line(completion: str) -> str:
    """A completion and its description on one line: Typer renders a description through Rich,
    which wraps it at 80 columns, and zsh and fish read each line as a completion of its own
    (``--daily.``, the end of ``--monthly``'s help, was offered as an option)."""
    return re.sub(r" *\n *", " ", completion)


def split_line(line: str) -> tuple[list[str], str]:
    """The words before the cursor and the word being typed, read as the shell reads them.

    A word may hold an escaped space or an open quote (``--tenant o\\'brien\\ `` or
    ``--tenant "o'brien ``): the line ending in a space does not mean a new word has begun.
    A marker typed at the cursor shows where the last word starts.
    """
    *words, last = split_arg_string(line + _MARK) or [_MARK]
    if not words:  # still on the program's name
        return [], ""
    return words[1:], last.removesuffix(_MARK)


_MARK = "\x00"


def _joined(get_completions: Callable[[list[str], str], list[CompletionItem]], args: list[str],
            incomplete: str) -> list[CompletionItem]:
    """The whole word: for ``--tenant=ac``, ``--tenant=acme`` where Typer offers ``acme``.
    Zsh and fish match what they are offered against the whole word."""
    option, equals, value = incomplete.partition("=")
    if not (equals and option.startswith("--")):
        return get_completions(args, incomplete)
    return [CompletionItem(f"{option}={item.value}", help=item.help)
            for item in get_completions([*args, option], value)]


def script(shell: str) -> str:
    """The completion script for ``shell`` (bash, zsh or fish), as ``mcpbill completion`` prints."""
    from typer._completion_shared import get_completion_script

    if shell == "bash":
        return BASH_SCRIPT % {"complete_func": "_mcpbill_completion", "prog_name": "mcpbill",
                              "autocomplete_var": COMPLETE_VAR}
    return get_completion_script(prog_name="mcpbill", complete_var=COMPLETE_VAR, shell=shell)


def tenants(ctx: typer.Context, incomplete: str) -> Candidates:
    """Tenants with a wallet in the ledger, with what they have available."""
    from mcpbill_cli.money import format_usd

    rows = _ledger_rows(ctx, _TENANTS, incomplete)
    return [(str(name), f"{format_usd(int(available))} USDC") for name, available in rows]


def tokens(ctx: typer.Context, incomplete: str) -> Candidates:
    """Every token's jti, newest first, with its tenant and agent."""
    return _tokens(ctx, incomplete, only_active=False)


def active_tokens(ctx: typer.Context, incomplete: str) -> Candidates:
    """The jti of tokens not revoked: what ``revoke`` and ``--parent`` can use."""
    return _tokens(ctx, incomplete, only_active=True)


def agents(ctx: typer.Context, incomplete: str) -> list[str]:
    """Agents (token subjects) the ledger has issued tokens to."""
    return [str(agent) for (agent,) in _ledger_rows(ctx, _AGENTS, incomplete)]


def tools(ctx: typer.Context, incomplete: str) -> list[str]:
    """Tool names priced in pricing.toml, for everyone or for a tenant."""
    try:
        document = _toml(_settings(ctx).pricing_path)
        names = set(_table(document, "tools"))
        for terms in _table(document, "tenants").values():
            names.update(_table(terms, "tools"))
    except _QUIET:
        return []
    return sorted(name for name in names if name.startswith(incomplete))


def chains(ctx: typer.Context, incomplete: str) -> Candidates:
    """The built-in chains and the ``[chains.NAME]`` of config.toml, with their CAIP-2 id."""
    from mcpbill_cli.wallet.chains import BUILTIN_CHAINS, configured_chains

    try:
        known = configured_chains(_settings(ctx).file)
    except _QUIET:
        known = BUILTIN_CHAINS
    return [(name, chain.caip2) for name, chain in sorted(known.items())
            if name.startswith(incomplete)]


def key_ids(ctx: typer.Context, incomplete: str) -> Candidates:
    """Signing keys not retired, from keyring.json, with algorithm and status: ids, never keys."""
    import json

    from mcpbill_cli.keys import INDEX

    try:
        document = json.loads((_settings(ctx).keys_dir / INDEX).read_bytes())
    except _QUIET:
        return []
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        return []
    return [(str(entry["kid"]), f"{entry.get('alg')} {entry.get('status')}") for entry in entries
            if _live_key(entry) and str(entry["kid"]).startswith(incomplete)]


def algorithms(incomplete: str) -> list[str]:
    """The signing algorithms ``init`` and ``keys rotate`` take."""
    from mcpbill_cli.keys import ALGORITHMS

    return [alg for alg in ALGORITHMS if alg.startswith(incomplete)]


def token_statuses(incomplete: str) -> list[str]:
    """The states ``token list --status`` takes."""
    from mcpbill_cli.ledger.credit import TOKEN_STATUSES

    return [status for status in TOKEN_STATUSES if status.startswith(incomplete)]


def token_sorts(incomplete: str) -> list[str]:
    """The fields ``token list --sort`` takes, each also descending with a leading ``-``."""
    from mcpbill_cli.ledger.credit import TOKEN_SORTS

    fields = [*TOKEN_SORTS, *(f"-{field}" for field in TOKEN_SORTS)]
    return [field for field in fields if field.startswith(incomplete)]


def _live_key(entry: Any) -> bool:
    return isinstance(entry, dict) and bool(entry.get("kid")) and entry.get("status") != "retired"


def _tokens(ctx: typer.Context, incomplete: str, *, only_active: bool) -> Candidates:
    sql = _ACTIVE_TOKENS if only_active else _TOKENS
    return [(str(jti), f"{tenant}/{agent}") for jti, tenant, agent
            in _ledger_rows(ctx, sql, incomplete)]


def _settings(ctx: typer.Context) -> Settings:
    """The settings as this command line gives them: ``--home`` and ``--db-url`` are parsed
    during completion, but the root callback that would build the CLI state does not run."""
    root = ctx.find_root().params
    return load_settings(home=root.get("home"), db_url=root.get("db_url"))


def _ledger_rows(ctx: typer.Context, sql: str, prefix: str) -> list[tuple[Any, ...]]:
    """The rows of a read-only query, or none when there is no ledger to read."""
    try:
        url = _settings(ctx).db_url
        if url.startswith("sqlite"):
            return _sqlite_rows(url, sql, prefix)
        return _server_rows(url, sql, prefix)
    except _QUIET:
        return []


def _sqlite_rows(url: str, sql: str, prefix: str) -> list[tuple[Any, ...]]:
    """Read a SQLite ledger through the driver, read-only: a missing file stays missing."""
    import sqlite3

    database = url.partition(":///")[2].partition("?")[0]
    if not database or database == ":memory:":
        return []
    uri = f"{Path(database).expanduser().resolve().as_uri()}?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=1)
    except sqlite3.Error:
        return []
    try:
        return connection.execute(sql, {"prefix": prefix}).fetchall()
    except sqlite3.Error:
        return []
    finally:
        connection.close()


def _server_rows(url: str, sql: str, prefix: str) -> list[tuple[Any, ...]]:
    """Read a PostgreSQL ledger on one short-lived connection, waiting briefly for it."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    try:
        parsed = make_url(url)
        if parsed.drivername == "postgresql":  # a bare postgresql:// means psycopg 3 here
            parsed = parsed.set(drivername="postgresql+psycopg")
        engine = create_engine(parsed, poolclass=NullPool,
                               connect_args={"connect_timeout": CONNECT_TIMEOUT})
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql), {"prefix": prefix})]
    except SQLAlchemyError:
        return []


def _toml(path: Path) -> dict[str, Any]:
    import tomllib

    with path.open("rb") as fh:
        return tomllib.load(fh)


def _table(document: Any, key: str) -> dict[str, Any]:
    """``document[key]`` when it is a table, else an empty one: files are not validated here."""
    value = document.get(key) if isinstance(document, dict) else None
    return value if isinstance(value, dict) else {}
