"""`mcpbill revoke` and `mcpbill revocations export`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mcpbill_cli.cli import complete
from mcpbill_cli.cli.confirm import YesOption, confirm
from mcpbill_cli.cli.output import JsonOption, emit, handles_errors, say
from mcpbill_cli.cli.state import State, state
from mcpbill_cli.clock import rfc3339
from mcpbill_cli.config import DEFAULT_TENANT
from mcpbill_cli.errors import InvalidInput
from mcpbill_cli.fsutil import write_atomic
from mcpbill_cli.money import format_usd

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy import Connection

    from mcpbill_cli.ledger.credit import Revocation

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
        "--tenant", "-t", help="Revoke every active token of this tenant; with --agent, the "
                               "tenant the agent is in.",
        show_default=f"{DEFAULT_TENANT!r} with --agent alone",
        autocompletion=complete.tenants)] = None,
    agent: Annotated[str | None, typer.Option(
        "--agent", help="Revoke every active token of this agent within one tenant (--tenant).",
        autocompletion=complete.agents)] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Kept in the audit trail.")
                      ] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show what would be revoked and released; change nothing.")] = False,
    yes: YesOption = False,
    as_json: JsonOption = False,
) -> None:
    """Revoke tokens now; children follow, unspent credit returns to the tenant at once.

    Revoking a revoked token is a successful no-op. --agent revokes one agent's tokens within
    one tenant: --tenant's, else the tenant default. --tenant and --agent ask first (--yes in
    scripts). Examples: mcpbill revoke tok_123; mcpbill revoke --tenant acme --agent crawler
    --reason "key leaked" --yes
    """
    from mcpbill_cli.ledger.credit import revoke as revoke_tokens
    from mcpbill_cli.ledger.engine import writing

    st = state(ctx)
    if bool(tokens) == bool(tenant or agent):
        raise InvalidInput("name tokens (JTI or JWT), or --tenant T, or --agent A (the agent in "
                           f"tenant {DEFAULT_TENANT}, or in T with --tenant T): one of these")
    chosen = None
    if tokens:
        jtis = [_jti_of(st, value) for value in tokens]
    else:
        chosen = Selection(tenant or DEFAULT_TENANT, agent)
        jtis = _confirmed_matches(st, chosen, named_tenant=tenant is not None,
                                  ask=not dry_run, yes=yes)
    with writing(st.engine()) as conn:
        outcomes = revoke_tokens(conn, jtis, reason=reason, clock=st.clock(), dry_run=dry_run)
    _render(outcomes, chosen, dry_run=dry_run, as_json=as_json)


@dataclass(frozen=True)
class Selection:
    """What a bulk revoke names: a tenant's tokens, or one agent's within a tenant."""

    tenant: str
    agent: str | None

    def __str__(self) -> str:
        if self.agent:
            return f"agent {self.agent} in tenant {self.tenant}"
        return f"tenant {self.tenant}"


def _render(outcomes: list[Revocation], chosen: Selection | None, *, dry_run: bool,
            as_json: bool) -> None:
    data = {"dry_run": dry_run, "tenant": chosen.tenant if chosen else None,
            "agent": chosen.agent if chosen else None, "revoked": [
                {"jti": o.jti, "tenant": o.tenant, "agent": o.agent,
                 "already_revoked": o.already, "released_usd": format_usd(o.released),
                 "cascaded_from": o.cascaded_from} for o in outcomes]}

    def human() -> None:
        verb = "would revoke" if dry_run else "revoked"
        for o in outcomes:
            note = " (already revoked)" if o.already else (
                f", {'would return' if dry_run else 'returned'} {format_usd(o.released)} USDC"
                if o.released else "")
            via = f" via {o.cascaded_from}" if o.cascaded_from else ""
            say(f"{verb} {o.jti} (agent {o.agent}, tenant {o.tenant}){via}{note}")
        if not outcomes:
            say(f"no active tokens of {chosen}" if chosen else "no active tokens matched")

    emit(data, as_json=as_json, human=human)


def _confirmed_matches(st: State, chosen: Selection, *, named_tenant: bool, ask: bool,
                       yes: bool) -> list[str]:
    """The active tokens of a tenant or of an agent in it; a bulk revocation is confirmed
    first, and revokes what was confirmed, not what was issued while the prompt waited."""
    from mcpbill_cli.ledger.credit import tokens_for
    from mcpbill_cli.ledger.engine import reading

    st.require_tenant(chosen.tenant)
    now = st.now()
    with reading(st.engine()) as conn:
        jtis = tokens_for(conn, tenant=chosen.tenant, agent=chosen.agent, now=now)
        elsewhere = [] if named_tenant or not chosen.agent else _tenants_elsewhere(
            conn, chosen, now=now)
    if elsewhere:
        say(f"note: agent {chosen.agent} also has active tokens in tenant(s) "
            f"{', '.join(elsewhere)}, left as they are: --tenant T revokes them there")
    if jtis and ask:
        confirm(f"Revoke {len(jtis)} active token(s) of {chosen}", yes=yes)
    return jtis


def _tenants_elsewhere(conn: Connection, chosen: Selection, *, now: datetime) -> list[str]:
    """Other tenants where an agent of the same name has active tokens: --agent alone used
    to revoke those too, so the operator is told they were left alone."""
    from mcpbill_cli.ledger.credit import list_views

    views = list_views(conn, now=now, agent=chosen.agent, status="active")
    return sorted({view.tenant for view in views} - {chosen.tenant})


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
    """Write revoked jti with their exp, for verifiers that have no ledger: each until its exp
    plus the leeway verifiers allow (leeway in config.toml, 30s by default)."""
    from mcpbill_cli.ledger.credit import revoked_list
    from mcpbill_cli.ledger.engine import reading

    st = state(ctx)
    now = st.now()
    with reading(st.engine()) as conn:
        revoked = revoked_list(conn, now=now, leeway=st.settings.leeway)
    document = {"version": REVOCATIONS_VERSION, "generated_at": rfc3339(now),
                "revoked": revoked}
    if out_file is not None:
        write_atomic(out_file, (json.dumps(document, indent=2) + "\n").encode())
        emit({"path": str(out_file), "count": len(revoked)}, as_json=as_json,
             human=lambda: say(f"wrote {len(revoked)} revoked token(s) to {out_file}"))
        return
    emit(document, as_json=as_json, human=lambda: typer.echo(json.dumps(document, indent=2)))
