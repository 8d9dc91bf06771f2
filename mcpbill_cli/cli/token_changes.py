"""`mcpbill token topup | extend`: more credit or more time for a live token."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpbill_cli.cli import complete
from mcpbill_cli.cli.output import JsonOption, emit, handles_errors, say, with_usd
from mcpbill_cli.cli.state import state
from mcpbill_cli.clock import utcnow
from mcpbill_cli.money import format_usd

JtiArgument = Annotated[str, typer.Argument(help="The token's jti (tok_...).",
                                            autocompletion=complete.tokens)]


@handles_errors
def topup(
    ctx: typer.Context,
    jti: JtiArgument,
    amount: Annotated[str, typer.Option(
        "--amount", help="USDC to move from the tenant (a child token: its parent), e.g. 2.50.")],
    as_json: JsonOption = False,
) -> None:
    """Give an active token more credit: its limit and remaining grow by AMOUNT, taken from
    its tenant's available balance in one transaction (refused if the tenant has less).

    The token itself does not change: agents keep using it. Example: mcpbill token topup
    tok_... --amount 5
    """
    from mcpbill_cli.ledger.engine import writing
    from mcpbill_cli.ledger.token_changes import topup as topup_token
    from mcpbill_cli.money import parse_usd

    credit = parse_usd(amount, field="amount")
    with writing(state(ctx).engine()) as conn:
        done = topup_token(conn, jti, credit, now=utcnow())
    emit(with_usd(done, "amount", "limit", "remaining"), as_json=as_json, human=lambda: say(
        f"topped up {done.jti} with {format_usd(done.amount)} USDC from {done.source}; "
        f"limit {format_usd(done.limit)}, {format_usd(done.remaining)} remaining"))
