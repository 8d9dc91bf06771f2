"""`mcpbill token issue | list | show | inspect | sweep`: spend-capped credit tokens."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mcpbill_cli.cli import complete, token_changes
from mcpbill_cli.cli.options import DryRunOption
from mcpbill_cli.cli.output import (
    Column,
    JsonOption,
    OutputOption,
    emit,
    emit_listing,
    handles_errors,
    output_format,
    print_fields,
    say,
    with_usd,
)
from mcpbill_cli.cli.state import State, state
from mcpbill_cli.config import DEFAULT_TENANT, ENV_TOKEN
from mcpbill_cli.money import format_usd

if TYPE_CHECKING:
    from mcpbill_cli.budgets import TokenTerms
    from mcpbill_cli.ledger.credit import TokenView
    from mcpbill_cli.tokens import Claims

app = typer.Typer(help="Credit tokens: issue, list, show, inspect, sweep, topup, extend.",
                  no_args_is_help=True)

_VIEW_AMOUNTS = ("limit", "spent", "held", "remaining")
LIST_COLUMNS = (
    Column("jti", lambda v: v.jti, ident=True), Column("tenant", lambda v: v.tenant),
    Column("agent", lambda v: v.agent), Column("status", lambda v: v.status),
    Column("limit", lambda v: format_usd(v.limit)), Column("spent", lambda v: format_usd(v.spent)),
    Column("remaining", lambda v: format_usd(v.remaining)),
    Column("expires", lambda v: f"{v.expires_at:%Y-%m-%d %H:%M}"),
)


@app.command("issue")
@handles_errors
def issue(
    ctx: typer.Context,
    limit: Annotated[str, typer.Option(
        "--limit", help="Spend limit in USDC, allotted from the tenant now, e.g. 5 or 0.25.")],
    ttl: Annotated[str | None, typer.Option(
        "--ttl", help="Lifetime: 90s, 15m, 24h, 2d (capped by ttl_cap, default 24h).")] = None,
    tenant: Annotated[str | None, typer.Option(
        "--tenant", "-t", help="Tenant to allot from.", show_default=DEFAULT_TENANT,
        autocompletion=complete.tenants)] = None,
    agent: Annotated[str, typer.Option("--agent", help="The agent's id (the `sub`).",
                                       autocompletion=complete.agents)] = "agent",
    scope: Annotated[list[str] | None, typer.Option(
        "--scope", help="Tool pattern the token may call (search, db.*, *); repeat for more. "
                        "Default: * (a child: its parent's scope).",
        autocompletion=complete.tools)] = None,
    aud: Annotated[str | None, typer.Option(
        "--audience", "--aud", help="Audience: the server(s) that accept it; for a server "
        "that takes it as Authorization: Bearer, that server's canonical URI (\\[mcp] resource).",
        show_default="config audience")] = None,
    parent: Annotated[str | None, typer.Option(
        "--parent", help="Parent jti: fund a sub-agent's child token from the parent's credit.",
        autocompletion=complete.active_tokens)] = None,
    rate: Annotated[list[str] | None, typer.Option(
        "--rate", metavar="CALLS/WINDOW",
        help="Loop protection: at most CALLS per second (/s) or minute (/m), e.g. 10/s; "
             "repeat for both windows. Over it: RATE_LIMITED with retryAfterMs.")] = None,
    spend_rate: Annotated[list[str] | None, typer.Option(
        "--spend-rate", metavar="USDC/WINDOW",
        help="Loop protection: at most USDC held by calls per second or minute, e.g. 1/m.")
    ] = None,
    daily: Annotated[str | None, typer.Option(
        "--daily", help="The most this token may spend per UTC day, in USDC.")] = None,
    monthly: Annotated[str | None, typer.Option(
        "--monthly", help="The most this token may spend per calendar month (UTC), in USDC; "
                          "not below --daily.")] = None,
    topup_below: Annotated[str | None, typer.Option(
        "--topup-below", help="Auto top-up: when a capture leaves less than this available, "
        "move credit from the tenant (a child: its parent) up to --topup-to.")] = None,
    topup_to: Annotated[str | None, typer.Option(
        "--topup-to", help="Auto top-up: what the token is topped up to, in USDC.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Mint a credit token; prints only the JWT, so TOKEN=$(mcpbill token issue ...) works.

    Example: mcpbill token issue --limit 5 --ttl 24h --scope search --scope "db.*"

    Example (loop protection): mcpbill token issue --limit 5 --rate 10/s --rate 100/m
    --spend-rate 1/m

    Budgets: mcpbill token issue --limit 5 --daily 2 --monthly 20 --topup-below 0.50 --topup-to 2
    """
    from mcpbill_cli.budgets import TokenTerms
    from mcpbill_cli.durations import parse_duration
    from mcpbill_cli.keys import active_signer
    from mcpbill_cli.ledger.credit import IssueRequest, require_tenant
    from mcpbill_cli.ledger.credit import issue as issue_token
    from mcpbill_cli.ledger.engine import writing
    from mcpbill_cli.money import parse_usd
    from mcpbill_cli.ratelimits import parse_rates
    from mcpbill_cli.tokens import validate_scope

    st = state(ctx)
    settings = st.settings
    request = IssueRequest(
        tenant=tenant or DEFAULT_TENANT, agent=agent, limit=parse_usd(limit, field="limit"),
        ttl=parse_duration(ttl, field="ttl") if ttl is not None else settings.default_ttl,
        scope=validate_scope(scope) if scope else None, audience=aud or settings.audience,
        issuer=settings.issuer, parent=parent, demo=settings.demo,
        rates=(*parse_rates(rate or [], spend=False, field="rate"),
               *parse_rates(spend_rate or [], spend=True, field="spend_rate")),
        terms=TokenTerms(*(None if text is None else parse_usd(text, field=name) for name, text
                           in (("daily", daily), ("monthly", monthly),
                               ("topup_below", topup_below), ("topup_to", topup_to)))))
    # The signing key stays the active one until the token is recorded: see active_signer.
    with active_signer(settings.keys_dir) as signer, writing(st.engine()) as conn:
        if parent is None:  # a child token's tenant is its parent's
            require_tenant(conn, request.tenant)
        issued = issue_token(conn, request, signer=signer, ttl_cap=settings.ttl_cap,
                             now=st.now())
        if parent is None:
            from mcpbill_cli.ledger.alerts import tenant_debited
            from mcpbill_cli.ledger.ops import tenant_account

            tenant_debited(conn, account=tenant_account(issued.claims.tenant),
                           amount=issued.claims.limit, at=issued.claims.issued_at)
    claims = issued.claims
    data = {"token": issued.token, "jti": claims.jti, "tenant": claims.tenant,
            "agent": claims.agent, "scope": list(claims.scope), "audience": claims.audience,
            "limit_usd": format_usd(claims.limit), "expires_at": claims.expires_at,
            "parent": claims.parent, "kid": claims.kid, "rate_limits": _rates_data(claims),
            **_terms_data(request.terms)}

    def human() -> None:
        typer.echo(issued.token)  # first: the one thing the caller must get
        say(f"issued {claims.jti}: {format_usd(claims.limit)} USDC for {claims.agent} "
            f"({claims.tenant}), expires {claims.expires_at:%Y-%m-%d %H:%M:%SZ}")
        if claims.rates:
            say(f"rate limits: {', '.join(r.render() for r in claims.rates if not r.spend)}"
                f"{' calls' if any(not r.spend for r in claims.rates) else ''}"
                f"{'; ' if any(r.spend for r in claims.rates) else ''}"
                f"{', '.join(r.render() for r in claims.rates if r.spend)}"
                f"{' USDC' if any(r.spend for r in claims.rates) else ''}")

    emit(data, as_json=as_json, human=human,
         lost=f"token {claims.jti} was issued but not printed; `mcpbill revoke "
              f"{claims.jti}` returns its {format_usd(claims.limit)} USDC to the tenant")
    if tenant and tenant != claims.tenant:
        say(f"[yellow]note[/]: a child token belongs to its parent's tenant {claims.tenant}")


@app.command("list")
@handles_errors
def list_tokens(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Only this tenant.",
                                               autocompletion=complete.tenants)] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent.",
                                              autocompletion=complete.agents)] = None,
    status: Annotated[str | None, typer.Option(
        "--status", help="active, revoked or expired.",
        autocompletion=complete.token_statuses)] = None,
    expiring: Annotated[str | None, typer.Option(
        "--expiring", metavar="DURATION",
        help="Only active tokens that expire within DURATION (90s, 15m, 24h, 2d).")] = None,
    sort: Annotated[str, typer.Option(
        "--sort", metavar="FIELD", help="issued, expires, jti, tenant, agent, limit, spent or "
                                        "remaining; a leading - sorts descending.",
        autocompletion=complete.token_sorts)] = "issued",
    count: Annotated[int | None, typer.Option(
        "--limit", metavar="N", min=1, max=1_000_000, help="At most N tokens.")] = None,
    output: OutputOption = None,
    as_json: JsonOption = False,
) -> None:
    """List tokens with their limit, spend and status.

    Example: mcpbill token list --expiring 1h --sort -remaining --limit 20
    """
    from mcpbill_cli.durations import parse_duration
    from mcpbill_cli.errors import InvalidInput
    from mcpbill_cli.ledger.credit import TOKEN_STATUSES, list_views
    from mcpbill_cli.ledger.engine import reading

    chosen = output_format(output, as_json)
    if status is not None and status not in TOKEN_STATUSES:
        raise InvalidInput(f"--status {status!r} is not one of {', '.join(TOKEN_STATUSES)}")
    within = parse_duration(expiring, field="expiring") if expiring is not None else None
    st = state(ctx)
    st.require_tenant(tenant)
    with reading(st.engine()) as conn:
        views = list_views(conn, now=st.now(), tenant=tenant, agent=agent, status=status,
                           expiring_within=within, sort=sort, limit=count)
    emit_listing(views, LIST_COLUMNS, output=chosen, records=[_view_data(v) for v in views])


@app.command("show")
@handles_errors
def show(ctx: typer.Context,
         jti: Annotated[str, typer.Argument(help="The token's jti (tok_...).",
                                            autocompletion=complete.tokens)],
         as_json: JsonOption = False) -> None:
    """Show one token: limit, spent, held, remaining, status and children."""
    from mcpbill_cli.ledger.credit import show as show_token
    from mcpbill_cli.ledger.engine import reading

    st = state(ctx)
    with reading(st.engine()) as conn:
        view = show_token(conn, jti, now=st.now())
    emit(_view_data(view), as_json=as_json, human=lambda: _render_view(view))


def _view_data(view: TokenView) -> dict[str, Any]:
    data = with_usd(view, *_VIEW_AMOUNTS)
    del data["terms"]
    return {**data, **_terms_data(view.terms)}


def _terms_data(terms: TokenTerms) -> dict[str, str | None]:
    """A token's caps and auto top-up as ``*_usd`` fields (null: not set)."""
    return {f"{name}_usd": None if amount is None else format_usd(amount) for name, amount in (
        ("daily_cap", terms.daily_cap), ("monthly_cap", terms.monthly_cap),
        ("topup_below", terms.topup_below), ("topup_to", terms.topup_to))}


def _render_view(view: TokenView) -> None:
    print_fields({key: _shown(value) for key, value in _view_data(view).items()})


def _shown(value: Any) -> str:
    if isinstance(value, dict):  # rate limits: calls 10/s, 100/m; spend 1.00/m
        return "; ".join(f"{key} {', '.join(rates)}" for key, rates in value.items()
                         if rates) or "-"
    return ", ".join(value) if isinstance(value, list) else ("-" if value is None else str(value))


@app.command("inspect")
@handles_errors
def inspect(
    ctx: typer.Context,
    token: Annotated[str | None, typer.Argument(
        help="The JWT, or - to read it from stdin. Default: $AGENT_CREDIT_JWT, else stdin.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Verify a token's signature and claims and show them; exits non-zero if it is invalid."""
    import os

    raw = token if token not in (None, "-") else None
    if raw is None and token is None:
        raw = os.environ.get(ENV_TOKEN)
    if raw is None:
        raw = _token_from_stdin(explicit=token is not None)
    data = _inspect(state(ctx), raw.strip())
    emit(data, as_json=as_json, human=lambda: _render_claims(data))


def _token_from_stdin(*, explicit: bool) -> str:
    """A token piped in; a terminal on stdin would only wait for a paste nobody was asked for,
    so without ``-`` that is a usage error."""
    if sys.stdin.isatty() and not explicit:
        raise typer.BadParameter(f"missing: give it as an argument, in {ENV_TOKEN}, or piped "
                                 "in with -", param_hint="TOKEN")
    piped = sys.stdin.read()
    if not piped.strip():  # nothing came: a missing token, not a malformed one
        raise typer.BadParameter(f"missing: stdin was empty; give it as an argument, in "
                                 f"{ENV_TOKEN}, or piped in with -", param_hint="TOKEN")
    return piped


def _inspect(st: State, raw: str) -> dict[str, Any]:
    from mcpbill_cli.errors import TokenRevoked
    from mcpbill_cli.ledger.credit import show as show_token
    from mcpbill_cli.ledger.engine import reading
    from mcpbill_cli.tokens import decode_token

    now = st.now()
    claims = decode_token(raw, st.keyring().verification_keys(), audience=None,
                          issuer=st.settings.issuer, leeway=st.settings.leeway, now=now)
    with reading(st.engine()) as conn:
        view = show_token(conn, claims.jti, now=now)
    if view.status == "revoked":
        raise TokenRevoked(f"token {claims.jti} was revoked at {view.revoked_at}",
                           jti=claims.jti)
    data = with_usd(claims, "limit")
    del data["terms"]
    fields = {**data, "rates": _rates_data(claims), **_terms_data(claims.terms)}
    return {"valid": True, "kid": claims.kid, **fields,
            "remaining_usd": format_usd(view.remaining), "status": view.status}


def _rates_data(claims: Claims) -> dict[str, list[str]]:
    """A token's own rate limits: ``{"calls": ["10/s"], "spend": ["1.00/m"]}`` (USDC)."""
    return {"calls": [r.render() for r in claims.rates if not r.spend],
            "spend": [r.render() for r in claims.rates if r.spend]}


def _render_claims(data: dict[str, Any]) -> None:
    print_fields({key: _shown(value) for key, value in data.items()})


@app.command("sweep")
@handles_errors
def sweep(ctx: typer.Context, dry_run: DryRunOption = False,
          as_json: JsonOption = False) -> None:
    """Return what expired (and revoked) tokens left unspent to their tenants."""
    from mcpbill_cli.ledger.credit import sweep as sweep_tokens
    from mcpbill_cli.ledger.engine import writing

    st = state(ctx)
    with writing(st.engine()) as conn:
        released = sweep_tokens(conn, now=st.now())
        if dry_run:  # the sweep itself, taken back: what it would release, exactly
            conn.rollback()
    data = {"dry_run": dry_run, "released": [
        {"jti": jti, "released_usd": format_usd(amount)} for jti, amount in released]}
    verb = "would release" if dry_run else "released"
    emit(data, as_json=as_json, human=lambda: say(
        f"{verb} {format_usd(sum(a for _, a in released))} USDC from {len(released)} token(s)"))


app.command("topup")(token_changes.topup)
app.command("extend")(token_changes.extend)
