"""The credit lifecycle on the ledger: fund a tenant, issue, show, revoke and sweep tokens.

Each function does its work inside the caller's transaction; a refusal raises and the caller's
rollback leaves the ledger exactly as it was.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, case, func, insert, select, update

from mcpbill_cli.budgets import TokenTerms, check_caps
from mcpbill_cli.clock import Clock, aware, rfc3339, utcnow
from mcpbill_cli.errors import IdempotencyConflict, InsufficientFunds, InvalidInput, NotFound
from mcpbill_cli.keys import KeyInfo
from mcpbill_cli.ledger import audit, ops
from mcpbill_cli.ledger.models import accounts, calls, refunds, tokens, transfers
from mcpbill_cli.money import format_usd
from mcpbill_cli.names import require_name
from mcpbill_cli.ratelimits import Rate, rates_claim
from mcpbill_cli.scope import within
from mcpbill_cli.tokens import Claims, encode_token, expires, new_jti

tk = tokens.c
RESULTS_OUTLIVE_TOKEN = timedelta(hours=1)
t = transfers.c
a = accounts.c

SPEND_CODES = ("charge", "capture")


@dataclass(frozen=True)
class IssueRequest:
    tenant: str
    agent: str
    limit: int
    ttl: int
    scope: list[str] | None
    audience: str
    issuer: str
    parent: str | None = None
    demo: bool = False
    rates: tuple[Rate, ...] = ()  # the token's own rate limits, signed into it
    terms: TokenTerms = TokenTerms()  # the token's own caps and auto top-up


@dataclass(frozen=True)
class IssuedToken:
    token: str = field(repr=False)
    claims: Claims


def issue(conn: Connection, request: IssueRequest, *, signer: tuple[KeyInfo, Any],
          ttl_cap: int, now: datetime) -> IssuedToken:
    """Record a token and allot its limit from the tenant (or its parent) in one transaction."""
    require_name(request.tenant, "tenant")
    require_name(request.agent, "agent")
    if request.ttl > ttl_cap:
        raise InvalidInput(f"ttl is above the cap of {ttl_cap}s; ask for less or raise ttl_cap",
                           field="ttl")
    _check_terms(request.terms)
    issued = now.replace(microsecond=0)  # JWT times are whole seconds; events keep `now`
    parent = _parent_row(conn, request, now) if request.parent else None
    scope = list(request.scope or (json.loads(parent.scope) if parent else ["*"]))
    exp = expires(issued, request.ttl)
    tenant = parent.tenant if parent else request.tenant
    if parent is not None:
        if not within(scope, json.loads(parent.scope)):
            raise InvalidInput(f"scope {scope} is wider than the parent's "
                               f"{json.loads(parent.scope)}", field="scope")
        exp = min(exp, aware(parent.expires_at))
    info, private_key = signer
    claims = Claims(jti=new_jti(), tenant=tenant, agent=request.agent, scope=tuple(scope),
                    audience=request.audience, issuer=request.issuer, issued_at=issued,
                    not_before=issued, expires_at=exp, limit=request.limit, kid=info.kid,
                    parent=request.parent, rates=request.rates, terms=request.terms)
    _record_token(conn, claims, demo=request.demo)
    source = ops.token_account(parent.jti) if parent else ops.tenant_account(tenant)
    _allot(conn, claims, source, code="child" if parent else "allot", at=now, demo=request.demo)
    return IssuedToken(encode_token(claims, info.alg, private_key), claims)


def _parent_row(conn: Connection, request: IssueRequest, now: datetime) -> Any:
    row = conn.execute(select(tokens).where(tk.jti == request.parent)).one_or_none()
    if row is None:
        raise NotFound(f"no token {request.parent}; `mcpbill token list` shows tokens")
    if row.revoked_at is not None or aware(row.expires_at) <= now:
        raise InvalidInput(f"parent token {row.jti} is {status_of(row, now)}; a child needs "
                           "an active parent", field="parent")
    return row


def _check_terms(terms: TokenTerms) -> None:
    """Caps above zero with a month not below a day; a top-up threshold above zero and a
    target above it, both given or neither."""
    problem = check_caps(terms.daily_cap, terms.monthly_cap)
    if problem is not None:
        raise InvalidInput(f"{problem}: --daily and --monthly take USDC, e.g. --daily 2 "
                           "--monthly 20", field="daily" if "daily" in problem else "monthly")
    below, to = terms.topup_below, terms.topup_to
    if (below is None) != (to is None):
        raise InvalidInput("auto top-up needs both --topup-below and --topup-to, e.g. "
                           "--topup-below 0.50 --topup-to 2", field="topup")
    if below is not None and to is not None and not 0 < below < to:
        raise InvalidInput("--topup-below must be above zero and below --topup-to, e.g. "
                           "--topup-below 0.50 --topup-to 2", field="topup")


def _record_token(conn: Connection, claims: Claims, *, demo: bool) -> None:
    conn.execute(insert(tokens).values(
        jti=claims.jti, tenant=claims.tenant, agent=claims.agent, kid=claims.kid,
        scope=json.dumps(list(claims.scope)), audience=claims.audience,
        parent_jti=claims.parent, limit_micro=claims.limit, issued_at=claims.issued_at,
        expires_at=claims.expires_at, demo=demo, **_terms_columns(claims)))
    ops.ensure_account(conn, ops.token_account(claims.jti), kind="token", guarded=True,
                       at=claims.issued_at)
    ops.ensure_account(conn, ops.revenue_account(claims.jti), kind="revenue", guarded=False,
                       at=claims.issued_at)


def _terms_columns(claims: Claims) -> dict[str, int | str]:
    """The token row's caps, top-up and rate limit columns that are set (none: a plain
    token's INSERT names only the columns every schema since 0001 has)."""
    terms = claims.terms
    columns: dict[str, int | str | None] = {
        "daily_cap_micro": terms.daily_cap, "monthly_cap_micro": terms.monthly_cap,
        "topup_below_micro": terms.topup_below, "topup_to_micro": terms.topup_to,
        "rate_limits": json.dumps(rates_claim(claims.rates)) if claims.rates else None}
    return {name: value for name, value in columns.items() if value is not None}


def _allot(conn: Connection, claims: Claims, source: str, *, code: str, at: datetime,
           demo: bool) -> None:
    ops.ensure_account(conn, source, kind="tenant", guarded=True, at=at)
    try:
        ops.transfer(conn, id=f"{code}:{claims.jti}", debit=source,
                     credit=ops.token_account(claims.jti), amount=claims.limit, code=code,
                     at=at, demo=demo, ref=claims.jti)
    except InsufficientFunds as exc:
        available = ops.balance(conn, source).available
        whose = f"parent token {claims.parent}" if claims.parent else f"tenant {claims.tenant}"
        hint = "" if claims.parent else (
            f"; fund it with `mcpbill wallet fund --tenant {claims.tenant} --demo AMOUNT`")
        raise InsufficientFunds(
            f"{whose} has {format_usd(available)} USDC available, less than the limit "
            f"{format_usd(claims.limit)}{hint}",
            available=format_usd(available), requested=format_usd(claims.limit),
        ) from exc
    audit.record(conn, "issue", at=at, jti=claims.jti, tenant=claims.tenant,
                 agent=claims.agent, amount=claims.limit, ref=claims.parent, demo=demo)


# --- funding ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Funding:
    tenant: str
    amount: int
    transfer_id: str
    available: int
    replayed: bool = False  # an idempotency key's earlier funding, returned again


def fund_demo(conn: Connection, tenant: str, amount: int, *, now: datetime,
              idempotency_key: str | None = None) -> Funding:
    """Credit ``tenant`` from the demo source (demo mode only; no chain involved).

    With ``idempotency_key`` (the tenant's own, like call keys) the funding happens once: the
    same key and amount again changes nothing, another amount is IDEMPOTENCY_CONFLICT.
    """
    require_name(tenant, "tenant")
    ops.ensure_account(conn, ops.DEMO_SOURCE, kind="chain", guarded=False, at=now)
    account = ops.tenant_account(tenant)
    ops.ensure_account(conn, account, kind="tenant", guarded=True, at=now)
    transfer_id = (ops.keyed_id("deposit:demo", tenant, idempotency_key)
                   if idempotency_key is not None
                   else f"deposit:demo:{uuid.uuid4().hex}")
    try:
        moved = ops.transfer(conn, id=transfer_id, debit=ops.DEMO_SOURCE, credit=account,
                             amount=amount, code="deposit", at=now, demo=True, ref="demo")
    except IdempotencyConflict:
        raise ops.key_conflict(conn, transfer_id, idempotency_key, did=f"funded {tenant}",
                               another="funding") from None
    if moved:
        audit.record(conn, "deposit", at=now, tenant=tenant, amount=amount, ref=transfer_id,
                     demo=True)
    return Funding(tenant, amount, transfer_id, ops.balance(conn, account).available,
                   replayed=not moved)


@dataclass(frozen=True)
class TenantBalance:
    """funded = available + allotted + held + spent, always (spent net of refunds)."""

    tenant: str
    funded: int
    allotted: int
    held: int
    spent: int
    available: int


def require_tenant(conn: Connection, tenant: str) -> None:
    """Refuse a tenant the ledger has no wallet for (never funded): NOT_FOUND, the same for
    every command that addresses one tenant, so a typo is never an empty success."""
    if conn.execute(select(a.id).where(a.id == ops.tenant_account(tenant))).first() is None:
        raise _unknown_tenant(tenant)


def _unknown_tenant(tenant: str) -> NotFound:
    return NotFound(f"tenant {tenant!r} has never been funded; "
                    f"`mcpbill wallet fund --tenant {tenant} --demo AMOUNT` funds it, "
                    "`mcpbill tenant list` lists the tenants", tenant=tenant)


def tenant_balance(conn: Connection, tenant: str) -> TenantBalance:
    account = ops.tenant_account(tenant)
    funded = conn.execute(select(func.coalesce(func.sum(t.amount), 0)).where(
        t.credit_account_id == account, t.code == "deposit")).scalar_one()
    token_accounts = select(("token:" + tk.jti).label("id")).where(tk.tenant == tenant)
    allotted, held = conn.execute(
        select(func.coalesce(func.sum(a.credits_posted - a.debits_posted - a.debits_pending), 0),
               func.coalesce(func.sum(a.debits_pending), 0))
        .where(a.id.in_(token_accounts))).one()
    spent = conn.execute(select(func.coalesce(func.sum(t.amount), 0)).where(
        t.debit_account_id.in_(token_accounts), t.code.in_(SPEND_CODES))).scalar_one()
    # Refunds gave some back, to the tokens (allotted again) or to the tenant (available).
    spent -= conn.execute(select(func.coalesce(func.sum(refunds.c.amount), 0)).where(
        refunds.c.tenant == tenant)).scalar_one()
    available = conn.execute(select(a.credits_posted - a.debits_posted - a.debits_pending)
                             .where(a.id == account)).scalar_one_or_none()
    if available is None and not funded:
        raise _unknown_tenant(tenant)
    return TenantBalance(tenant, int(funded), int(allotted), int(held), int(spent),
                         int(available or 0))


# --- views --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenView:
    jti: str
    tenant: str
    agent: str
    scope: list[str]
    status: str
    limit: int
    spent: int
    held: int
    remaining: int
    issued_at: datetime
    expires_at: datetime
    parent: str | None
    revoked_at: datetime | None
    revoke_reason: str | None
    children: list[str]
    terms: TokenTerms = TokenTerms()


def status_of(row: Any, now: datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    return "expired" if aware(row.expires_at) <= now else "active"


def _views_query() -> Any:
    spent = (select(func.coalesce(func.sum(t.amount), 0))
             .where(t.debit_account_id == "token:" + tk.jti, t.code.in_(SPEND_CODES))
             .scalar_subquery())
    return (select(tokens, a.debits_pending.label("held"),
                   (a.credits_posted - a.debits_posted - a.debits_pending).label("remaining"),
                   spent.label("spent"))
            .join(accounts, a.id == "token:" + tk.jti))


def _view(row: Any, now: datetime, children: list[str]) -> TokenView:
    return TokenView(
        jti=row.jti, tenant=row.tenant, agent=row.agent, scope=json.loads(row.scope),
        status=status_of(row, now), limit=row.limit_micro, spent=int(row.spent),
        held=int(row.held), remaining=int(row.remaining), issued_at=aware(row.issued_at),
        expires_at=aware(row.expires_at), parent=row.parent_jti,
        revoked_at=aware(row.revoked_at) if row.revoked_at else None,
        revoke_reason=row.revoke_reason, children=children,
        terms=TokenTerms(row.daily_cap_micro, row.monthly_cap_micro, row.topup_below_micro,
                         row.topup_to_micro))


def show(conn: Connection, jti: str, *, now: datetime) -> TokenView:
    row = conn.execute(_views_query().where(tk.jti == jti)).one_or_none()
    if row is None:
        raise NotFound(f"no token {jti}; `mcpbill token list` shows tokens")
    children = list(conn.execute(select(tk.jti).where(tk.parent_jti == jti)
                                 .order_by(tk.issued_at)).scalars())
    return _view(row, now, children)


_FAR_FUTURE = 1000 * 365 * 86400  # seconds: any longer window would overflow a datetime
# `token list --status`: what a token can be
TOKEN_STATUSES = ("active", "revoked", "expired")
# `token list --sort`: a field of the listing -> the column it orders by
TOKEN_SORTS = {"issued": "issued_at", "expires": "expires_at", "jti": "jti", "tenant": "tenant",
               "agent": "agent", "limit": "limit_micro", "spent": "spent",
               "remaining": "remaining"}


def list_views(conn: Connection, *, now: datetime, tenant: str | None = None,
               agent: str | None = None, status: str | None = None,
               expiring_within: int | None = None, sort: str = "issued",
               limit: int | None = None) -> list[TokenView]:
    """Tokens, filtered; ``expiring_within`` (seconds) keeps active tokens that expire within
    it; ``sort`` is a key of :data:`TOKEN_SORTS`, descending with a leading ``-``."""
    query = _filtered(_views_query(), now=now, tenant=tenant, agent=agent, status=status)
    if expiring_within is not None:
        horizon = now + timedelta(seconds=min(expiring_within, _FAR_FUTURE))
        query = query.where(tk.revoked_at.is_(None), tk.expires_at > now,
                            tk.expires_at <= horizon)
    query = _sorted(query, sort).limit(limit)
    return [_view(row, now, []) for row in conn.execute(query)]


def _filtered(query: Any, *, now: datetime, tenant: str | None, agent: str | None,
              status: str | None) -> Any:
    if tenant:
        query = query.where(tk.tenant == tenant)
    if agent:
        query = query.where(tk.agent == agent)
    if status == "revoked":
        query = query.where(tk.revoked_at.is_not(None))
    elif status == "expired":
        query = query.where(tk.revoked_at.is_(None), tk.expires_at <= now)
    elif status == "active":
        query = query.where(tk.revoked_at.is_(None), tk.expires_at > now)
    return query


def _sorted(query: Any, sort: str) -> Any:
    name = sort.removeprefix("-")
    if name not in TOKEN_SORTS:
        raise InvalidInput(f"--sort {sort!r} is not one of {', '.join(TOKEN_SORTS)} "
                           "(a leading - sorts descending)", field="sort")
    column = query.selected_columns[TOKEN_SORTS[name]]
    return query.order_by(column.desc() if sort.startswith("-") else column.asc(), tk.jti)


# --- revocation and sweeping --------------------------------------------------------------------


@dataclass(frozen=True)
class Revocation:
    jti: str
    already: bool
    released: int
    cascaded_from: str | None
    tenant: str
    agent: str


def tokens_for(conn: Connection, *, tenant: str, agent: str | None,
               now: datetime) -> list[str]:
    """Active tokens of a tenant, or of one of its agents (an agent is a token's ``sub``
    within its tenant); :func:`revoke` takes their children along, whoever's they are."""
    query = select(tk.jti).where(tk.tenant == tenant, tk.revoked_at.is_(None),
                                 tk.expires_at > now)
    if agent:
        query = query.where(tk.agent == agent)
    return list(conn.execute(query.order_by(tk.issued_at)).scalars())


def revoke(conn: Connection, jtis: Iterable[str], *, reason: str | None,
           clock: Clock = utcnow, dry_run: bool = False) -> list[Revocation]:
    """Revoke tokens and their descendants; each unspent, unheld remainder returns at once.

    The revocation time is read from ``clock`` once the plan's accounts are locked (see
    :func:`_lock_accounts`), and stamps the tokens, their events and the released remainders.
    A dry run revokes the same way in a savepoint it then rolls back, so it reports the very
    amounts a revoke would release now and leaves nothing written.
    """
    named = list(dict.fromkeys(jtis))
    if not dry_run:
        return _revoke(conn, named, reason=reason, clock=clock)
    savepoint = conn.begin_nested()
    try:
        return _revoke(conn, named, reason=reason, clock=clock)
    finally:
        savepoint.rollback()


def _revoke(conn: Connection, jtis: list[str], *, reason: str | None,
            clock: Clock) -> list[Revocation]:
    plan = _revocation_plan(conn, jtis)
    _lock_accounts(conn, [jti for jti, _, _ in plan])
    now = clock()
    outcomes = []
    for jti, row, origin in plan:
        closed = conn.execute(update(tokens).where(tk.jti == jti, tk.revoked_at.is_(None))
                              .values(revoked_at=now, revoke_reason=reason)).rowcount == 1
        ops.close_account(conn, ops.token_account(jti))
        if closed:
            audit.record(conn, "revoke", at=now, jti=jti, tenant=row.tenant, agent=row.agent,
                         ref=origin, detail={"reason": reason} if reason else None)
        outcomes.append((jti, row, origin, not closed))
    released = {jti: _release(conn, row, now) for jti, row, _, _ in reversed(outcomes)}
    return [Revocation(jti, already, released[jti], origin, row.tenant, row.agent)
            for jti, row, origin, already in outcomes]


def _lock_accounts(conn: Connection, jtis: list[str]) -> None:
    """Wait for the charges in flight on these tokens to commit, and keep later ones waiting.

    A charge or hold reads its time (``calls.created_at``) before it commits (today: before
    its transaction opens), and debits the token's account row with a conditional UPDATE whose
    row lock it keeps until it commits. So a charge that committed before the revoke took
    these locks read its time before the revoke reads its own, after them: its ``created_at``
    is earlier than ``revoked_at``. Any later charge waits for the revoke to commit and then
    finds the account closed: refused. (Times of one clock: servers whose clocks disagree can
    still disagree here.)
    PostgreSQL: FOR UPDATE, in id order so that two revokes cannot deadlock. SQLite ignores
    FOR UPDATE: ``BEGIN IMMEDIATE`` (see :func:`~mcpbill_cli.ledger.engine.writing`) already
    holds the database's write lock.
    """
    ids = [ops.token_account(jti) for jti in jtis]
    conn.execute(select(a.id).where(a.id.in_(ids)).order_by(a.id).with_for_update()).all()


def _revocation_plan(conn: Connection, jtis: list[str]) -> list[tuple[str, Any, str | None]]:
    """Each named token then its descendants, breadth first; unknown jti refuse the whole call."""
    rows = {r.jti: r for r in conn.execute(select(tokens).where(tk.jti.in_(jtis)))}
    missing = [j for j in jtis if j not in rows]
    if missing:
        raise NotFound(f"no token {', '.join(missing)}; nothing was revoked")
    plan: list[tuple[str, Any, str | None]] = [(j, rows[j], None) for j in jtis]
    frontier = [(j, j) for j in jtis]
    seen = set(jtis)
    while frontier:
        origins = dict(frontier)
        children = conn.execute(select(tokens).where(tk.parent_jti.in_(list(origins))))
        frontier = []
        for child in children:
            if child.jti not in seen:
                seen.add(child.jti)
                origin = origins[child.parent_jti]
                plan.append((child.jti, child, origin))
                frontier.append((child.jti, origin))
    return plan


def _release(conn: Connection, row: Any, now: datetime) -> int:
    """Return a token's remainder to its parent while the parent is active, else the tenant."""
    target = ops.tenant_account(row.tenant)
    if row.parent_jti:
        parent = conn.execute(select(tokens).where(tk.jti == row.parent_jti)).one()
        if status_of(parent, now) == "active":
            target = ops.token_account(parent.jti)
    transfer_id = f"release:{row.jti}:{uuid.uuid4().hex[:12]}"
    released = ops.release_available(
        conn, id=transfer_id, debit=ops.token_account(row.jti), credit=target, code="release",
        at=now, demo=row.demo, ref=row.jti)
    if released:  # the event names the transfer, so the seal that takes it covers the money
        audit.record(conn, "release", at=now, jti=row.jti, tenant=row.tenant, agent=row.agent,
                     amount=released, ref=transfer_id, demo=row.demo)
    return released


def sweep(conn: Connection, *, now: datetime) -> list[tuple[str, int]]:
    """Release what expired or revoked tokens still hold unspent; returns (jti, amount) pairs.

    The tool results kept for replays of those tokens' calls go too: a replay needs a token
    that is neither expired (an hour past, well beyond any leeway) nor revoked.
    """
    expire_holds(conn, now=now)
    _forget_results(conn, now - RESULTS_OUTLIVE_TOKEN)
    available = a.credits_posted - a.debits_posted - a.debits_pending
    rows = conn.execute(
        select(tokens).join(accounts, a.id == "token:" + tk.jti)
        .where(available > 0, (tk.revoked_at.is_not(None)) | (tk.expires_at <= now))
        .order_by(case((tk.parent_jti.is_(None), 1), else_=0), tk.issued_at.desc()))
    released = [(row.jti, _release(conn, row, now)) for row in rows.all()]
    return [(jti, amount) for jti, amount in released if amount]


def _forget_results(conn: Connection, expired_before: datetime) -> None:
    done = select(tk.jti).where(tk.revoked_at.is_not(None) | (tk.expires_at <= expired_before))
    conn.execute(update(calls).where(calls.c.result.is_not(None), calls.c.jti.in_(done))
                 .values(result=None))


def expire_holds(conn: Connection, *, now: datetime, account: str | None = None) -> int:
    """Void every hold past its timeout (optionally only on ``account``); returns how many."""
    from mcpbill_cli.ledger.calls import expire_call

    count = 0
    while batch := ops.expired_holds(conn, at=now, debit=account):
        voided = sum(expire_call(conn, pending_id, now=now) for pending_id in batch)
        if not voided:  # nothing left that can move: never spin
            break
        count += voided
    return count


def revoked_list(conn: Connection, *, now: datetime, leeway: int = 0
                 ) -> list[dict[str, Any]]:
    """Revoked tokens a verifier may still accept, for stateless verifiers: ``[{jti,
    expires_at}]``, the time in RFC 3339 form. A token stays listed ``leeway`` seconds past
    its ``exp``, as long as verifiers accept it (their own leeway)."""
    rows = conn.execute(select(tk.jti, tk.expires_at).where(
        and_(tk.revoked_at.is_not(None), tk.expires_at > now - timedelta(seconds=leeway)))
        .order_by(tk.jti))
    return [{"jti": jti, "expires_at": rfc3339(exp)} for jti, exp in rows]


def last_expiry(conn: Connection, kid: str) -> datetime | None:
    """When the last token signed by ``kid`` expires (None if it signed none)."""
    value = conn.execute(select(func.max(tk.expires_at)).where(tk.kid == kid)).scalar_one()
    return aware(value) if value is not None else None


def live_tokens_signed_by(conn: Connection, kid: str, *, now: datetime) -> int:
    return int(conn.execute(select(func.count()).where(
        tk.kid == kid, tk.revoked_at.is_(None), tk.expires_at > now)).scalar_one())
