"""`mcpbill token topup | extend`: more credit or more time for a live token."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpbill_cli.cli import complete
from mcpbill_cli.cli.output import JsonOption, emit, handles_errors, say, with_usd
from mcpbill_cli.cli.state import state
from mcpbill_cli.clock import rfc3339
from mcpbill_cli.money import format_usd

JtiArgument = Annotated[str, typer.Argument(help="The token's jti (tok_...).",
                                            autocompletion=complete.tokens)]


@handles_errors
def topup(
    ctx: typer.Context,
    jti: JtiArgument,
    amount: Annotated[str, typer.Option(
        "--amount", help="USDC to move from the tenant (a child token: its parent), e.g. 2.50.")],
    idempotency_key: Annotated[str | None, typer.Option(
        "--idempotency-key", metavar="KEY",
        help="Top up once per KEY (the token's): a retry changes nothing, another amount is "
             "IDEMPOTENCY_CONFLICT.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Give an active token more credit: its limit and remaining grow by AMOUNT, taken from
    its tenant's available balance in one transaction (refused if the tenant has less).

    The token itself does not change: agents keep using it. In scripts that may retry, pass
    --idempotency-key. Example: mcpbill token topup tok_... --amount 5 --idempotency-key run-42
    """
    from mcpbill_cli.ledger.engine import writing
    from mcpbill_cli.ledger.token_changes import topup as topup_token
    from mcpbill_cli.money import parse_usd

    credit = parse_usd(amount, field="amount")
    st = state(ctx)
    with writing(st.engine()) as conn:
        now = st.now()
        done = topup_token(conn, jti, credit, now=now, idempotency_key=idempotency_key)
        if not done.replayed and done.source.startswith("tenant:"):
            from mcpbill_cli.ledger.alerts import tenant_debited

            tenant_debited(conn, account=done.source, amount=done.amount, at=now)
    what = "already topped up (this key)" if done.replayed else "topped up"
    emit(with_usd(done, "amount", "limit", "remaining"), as_json=as_json, human=lambda: say(
        f"{what} {done.jti} with {format_usd(done.amount)} USDC from {done.source}; "
        f"limit {format_usd(done.limit)}, {format_usd(done.remaining)} remaining"))


@handles_errors
def extend(
    ctx: typer.Context,
    jti: JtiArgument,
    ttl: Annotated[str, typer.Option(
        "--ttl", help="New lifetime from now: 90s, 15m, 24h, 2d (at most ttl_cap from the "
                      "token's issue).")],
    as_json: JsonOption = False,
) -> None:
    """Let an active token live longer; prints the token again with its new expiry, so
    TOKEN=$(mcpbill token extend JTI --ttl 12h) works.

    A JWT's exp is signed: the earlier JWT still expires when it said (give the agent the new
    one); both spend the same credit. Only tokens signed by the active key can be extended.
    """
    from mcpbill_cli.durations import parse_duration
    from mcpbill_cli.keys import active_signer
    from mcpbill_cli.ledger.engine import writing
    from mcpbill_cli.ledger.token_changes import extend as extend_token

    st = state(ctx)
    settings = st.settings
    seconds = parse_duration(ttl, field="ttl")
    # The new exp is in the ledger before a rotation reads how long the key must verify.
    with active_signer(settings.keys_dir) as signer, writing(st.engine()) as conn:
        done = extend_token(conn, jti, seconds, now=st.now(), signer=signer,
                            issuer=settings.issuer, ttl_cap=settings.ttl_cap)
    data = {"token": done.token, "jti": done.jti, "expires_at": rfc3339(done.expires_at),
            "previous_expires_at": rfc3339(done.previous_expires_at)}

    def human() -> None:
        typer.echo(done.token)  # first: what the caller must get
        say(f"extended {done.jti} to {data['expires_at']} (was {data['previous_expires_at']}); "
            "the earlier JWT still expires then")

    emit(data, as_json=as_json, human=human)
