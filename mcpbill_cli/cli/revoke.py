"""`mcpbill revoke` and `mcpbill revocations export`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mcpbill_cli.cli import complete
from mcpbill_cli.cli.confirm import YesOption, confirm
from mcpbill_cli.cli.output import JsonOption, emit, handles_errors, say
from mcpbill_cli.cli.state import State, state
from mcpbill_cli.clock import rfc3339
from mcpbill_cli.errors import InvalidInput
from mcpbill_cli.fsutil import write_atomic
from mcpbill_cli.money import format_usd

# Version 2 lists each token's `expires_at` (RFC 3339); version 1 had `exp` (epoch seconds).
REVOCATIONS_VERSION = 2

revocations_app = typer.Typer(help="Revocation lists for stateless verifiers.",
                              no_args_is_help=True)


@handles_errors
def revoke(
    ctx: typer.Context,
    tokens: Annotated[list[str] | None, typer.Argument(
        metavar="JTI|JWT...", help="Tokens to revoke, by jti or as the JWT itself.",
        autocompletion=complete.active_tokens)] = None,
    tenant: Annotated[str | None, typer.Option(
        "--tenant", "-t", help="Revoke every active token of this tenant.",
        autocompletion=complete.tenants)] = None,
    agent: Annotated[str | None, typer.Option(
        "--agent", help="Revoke every active token of this agent.",
        autocompletion=complete.agents)] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Kept in the audit trail.")
                      ] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show what would be revoked; change nothing.")] = False,
    yes: YesOption = False,
    as_json: JsonOption = False,
) -> None:
    """Revoke tokens now; children follow, unspent credit returns to the tenant at once.

    Revoking a revoked token is a successful no-op. --tenant and --agent ask first (--yes in
    scripts). Examples: mcpbill revoke tok_123; mcpbill revoke --agent crawler --reason "key
    leaked" --yes
    """
    from mcpbill_cli.ledger.credit import revoke as revoke_tokens
    from mcpbill_cli.ledger.engine import writing

    st = state(ctx)
    if bool(tokens) + bool(tenant) + bool(agent) != 1:
        raise InvalidInput("name tokens (JTI or JWT), or --tenant T, or --agent A: exactly one")
    jtis = ([_jti_of(st, value) for value in tokens] if tokens
            else _confirmed_matches(st, tenant, agent, ask=not dry_run, yes=yes))
    with writing(st.engine()) as conn:
        outcomes = revoke_tokens(conn, jtis, reason=reason, clock=st.clock(), dry_run=dry_run)
        if dry_run:
            conn.rollback()
    data = {"dry_run": dry_run, "revoked": [
        {"jti": o.jti, "already_revoked": o.already, "released_usd": format_usd(o.released),
         "cascaded_from": o.cascaded_from} for o in outcomes]}

    def human() -> None:
        verb = "would revoke" if dry_run else "revoked"
        for o in outcomes:
            note = " (already revoked)" if o.already else (
                f", returned {format_usd(o.released)} USDC" if o.released else "")
            via = f" via {o.cascaded_from}" if o.cascaded_from else ""
            say(f"{verb} {o.jti}{via}{note}")
        if not outcomes:
            say("no active tokens matched")

    emit(data, as_json=as_json, human=human)


def _confirmed_matches(st: State, tenant: str | None, agent: str | None, *, ask: bool,
                       yes: bool) -> list[str]:
    """The active tokens of a tenant or agent; a bulk revocation is confirmed first, and
    revokes what was confirmed, not what was issued while the prompt waited."""
    from mcpbill_cli.ledger.credit import tokens_for
    from mcpbill_cli.ledger.engine import reading

    st.require_tenant(tenant)
    with reading(st.engine()) as conn:
        jtis = tokens_for(conn, tenant=tenant, agent=agent, now=st.now())
    if jtis and ask:
        whose = f"tenant {tenant}" if tenant else f"agent {agent}"
        confirm(f"Revoke {len(jtis)} active token(s) of {whose}", yes=yes)
    return jtis


def _jti_of(st: State, value: str) -> str:
    """A jti as given, or the jti of a JWT whose signature verifies (expired is fine)."""
    if value.count(".") != 2:
        return value
    from mcpbill_cli.tokens import decode_token

    claims = decode_token(value, st.keyring().verification_keys(), audience=None, issuer=None,
                          verify_exp=False)
    return claims.jti


@revocations_app.command("export")
@handles_errors
def export(
    ctx: typer.Context,
    out_file: Annotated[Path | None, typer.Option("--out", help="Write to this file.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Write revoked, unexpired jti with their exp, for verifiers that have no ledger."""
    from mcpbill_cli.ledger.credit import revoked_list
    from mcpbill_cli.ledger.engine import reading

    st = state(ctx)
    now = st.now()
    with reading(st.engine()) as conn:
        revoked = revoked_list(conn, now=now)
    document = {"version": REVOCATIONS_VERSION, "generated_at": rfc3339(now),
                "revoked": revoked}
    if out_file is not None:
        write_atomic(out_file, (json.dumps(document, indent=2) + "\n").encode())
        emit({"path": str(out_file), "count": len(revoked)}, as_json=as_json,
             human=lambda: say(f"wrote {len(revoked)} revoked token(s) to {out_file}"))
        return
    emit(document, as_json=as_json, human=lambda: typer.echo(json.dumps(document, indent=2)))
