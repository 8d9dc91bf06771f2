"""`mcpbill refund RCPT`: give back what a captured call charged, in full or in part."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpbill_cli.cli.output import JsonOption, emit, handles_errors, receipt_data, say
from mcpbill_cli.cli.state import state


@handles_errors
def refund(
    ctx: typer.Context,
    receipt_id: Annotated[str, typer.Argument(
        metavar="RCPT", help="The call's receipt id (rcpt_…).")],
    amount: Annotated[str | None, typer.Option(
        "--amount", help="USDC to give back, e.g. 0.02 (default: all that is left to refund "
                         "of the charge).")] = None,
    reason: Annotated[str | None, typer.Option(
        "--reason", help="Why, signed into the refund receipt.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(
        "--idempotency-key", metavar="KEY",
        help="Refund once per KEY (the tenant's): a retry refunds nothing more, another "
             "amount or call is IDEMPOTENCY_CONFLICT.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Refund a captured call: to its token while the token is active, else to its tenant;
    prints the signed refund receipt's fields.

    Repeatable up to the call's charge, never beyond (REFUND_EXCEEDS_CHARGE, exit 5). In
    scripts that may retry, pass --idempotency-key. Example: mcpbill refund rcpt_… --amount
    0.02 --reason "timed out" --idempotency-key ticket-812
    """
    from mcpbill_cli.money import format_usd, parse_usd
    from mcpbill_cli.refunding import refund as refund_call

    st = state(ctx)
    micro = None if amount is None else parse_usd(amount, field="amount")
    network = "mcpbill:demo" if st.settings.demo else "mcpbill:ledger"
    done = refund_call(st.engine(), st.keyring().signing_key(), receipt_id, amount=micro,
                       reason=reason, idempotency_key=idempotency_key, network=network,
                       clock=st.clock())
    data = {**receipt_data(done.claims), "replayed": done.replayed, "jws": done.jws}
    what = "already refunded (this key)" if done.replayed else "refunded"
    emit(data, as_json=as_json, human=lambda: say(
        f"{what} {format_usd(done.amount)} USDC of {done.receipt_id} to "
        f"{done.claims['creditedTo']}; {format_usd(done.refundable)} USDC left to refund "
        f"(refund {done.refund_id})"))
