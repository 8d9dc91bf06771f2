"""The names mcpbill keeps for others: tenants, agents, and a token's audience and issuer.

One rule for each, wherever the name comes in (a CLI option, a library call): non-empty
printable text without outer spaces, at most as long as the ledger column that keeps it.
Printable leaves out control characters, which a listing would hand to the terminal to run,
and the lone surrogates Python reads bytes that are not UTF-8 as, which no database stores.
Outer spaces would make ``acme `` a second tenant that lists like ``acme``.
"""

from __future__ import annotations

from mcpbill_cli.errors import InvalidInput

# The lengths of the ledger columns (tokens.tenant, tokens.agent, tokens.audience, ...), so a
# name that fits on SQLite fits on PostgreSQL too. The issuer is kept in no column; it is held
# to the audience's length.
MAX_LENGTH = {"tenant": 100, "agent": 200, "audience": 200, "issuer": 200}


def name_problem(name: str, what: str, max_length: int) -> str | None:
    """Why ``name`` cannot name a ``what``, or None when it can."""
    if not name or name != name.strip() or not name.isprintable():
        return f"{what} name {name!r} must be non-empty printable text without outer spaces"
    if len(name) > max_length:
        return f"{what} name {name[:20]!r}... is longer than {max_length} characters"
    return None


def require_name(name: str, what: str) -> str:
    """``name``, or INVALID_INPUT (``field``: ``what``) when it cannot name a ``what``: one
    of ``tenant``, ``agent``, ``audience`` or ``issuer``."""
    problem = name_problem(name, what, MAX_LENGTH[what])
    if problem is not None:
        raise InvalidInput(problem, field=what)
    return name
