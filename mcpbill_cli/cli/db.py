"""`mcpbill db upgrade | status`: schema migrations, run only when asked."""

from __future__ import annotations

import typer

from mcpbill_cli.cli.output import JsonOption, emit, handles_errors, out, say
from mcpbill_cli.cli.state import State, state
from mcpbill_cli.config import redact_url

app = typer.Typer(help="Ledger schema: status and migrations.", no_args_is_help=True)


@app.command("upgrade")
@handles_errors
def upgrade(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Migrate the ledger to this version's schema (creates the tables on an empty database),
    then seal the audit trail with the home's signing key, if it has one.

    The home's own ledger is made by `mcpbill init`; a ledger that --db-url or
    MCPBILL_DB_URL names may be new.
    """
    from mcpbill_cli.ledger import schema

    st = state(ctx)
    before, after = schema.upgrade(st.engine(check=False, create=True))
    sealed = _seal(st)
    data = {"db_url": redact_url(st.settings.db_url), "from": before, "to": after,
            "changed": before != after, "sealed_events": sealed}
    emit(data, as_json=as_json, human=lambda: say(
        f"ledger at schema {after}" + (f" (was {before or 'empty'})" if before != after
                                       else " already")
        + (f"; sealed {sealed} event(s)" if sealed else "")))


def _seal(st: State) -> int | None:
    """Events sealed with the home's key; ``None`` without a key ring (`audit seal` later)."""
    from mcpbill_cli.keys import KeyRing
    from mcpbill_cli.ledger.sealing import seal_all
    from mcpbill_cli.ledger.seals import signer

    if not KeyRing.exists(st.settings.keys_dir):
        return None
    info, key = st.keyring().signing_key()
    return sum(s.count for s in seal_all(st.engine(), signer(info.alg, info.kid, key),
                                         clock=st.clock(), wait=True))


@app.command("status")
@handles_errors
def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Show the ledger's schema revision and whether `mcpbill db upgrade` is needed."""
    from mcpbill_cli.ledger.engine import current_revision
    from mcpbill_cli.ledger.models import SCHEMA_REVISION

    st = state(ctx)
    current = current_revision(st.engine(check=False))
    data = {"db_url": redact_url(st.settings.db_url), "current": current,
            "required": SCHEMA_REVISION, "up_to_date": current == SCHEMA_REVISION}
    emit(data, as_json=as_json, human=lambda: out.print(
        f"{data['db_url']}: schema {current or 'empty'}, needs {SCHEMA_REVISION}"
        + ("" if data["up_to_date"] else " (run `mcpbill db upgrade`)")))
