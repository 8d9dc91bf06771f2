"""`mcpbill x402 fetch`: try the downstream x402 resolver from the shell.

The resolver (``mcpbill_cli.x402``: httpx, the ledger, eth-account) loads inside the command body
only, so `mcpbill --help` and `mcpbill token issue` never import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from mcpbill_cli.cli import complete
from mcpbill_cli.cli.output import (
    Column,
    JsonOption,
    emit,
    handles_errors,
    receipt_data,
    say,
    show_listing,
    wire_to_cli,
)
from mcpbill_cli.cli.state import State, state
from mcpbill_cli.config import ENV_TOKEN

if TYPE_CHECKING:
    from mcpbill_cli.x402 import FetchResult, PaymentPolicy
    from mcpbill_cli.x402.signing import TypedDataSigner

DEFAULT_MAX = "1.00"
DEFAULT_TOOL = "x402.fetch"
_EXCERPT_BYTES = 300  # of an error page, in the error: enough to see what the server said

app = typer.Typer(help="Pay downstream x402 (HTTP 402) challenges within an agent's budget.",
                  no_args_is_help=True)


@app.command("fetch")
@handles_errors
def fetch(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="The URL to GET (a paid API answering 402).")],
    token: Annotated[str | None, typer.Option(
        "--token", envvar=ENV_TOKEN, show_default=False,
        help="The agent's credit token that pays (its budget, scope and daily cap).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show the requirements and the decision; hold and sign nothing.")
    ] = False,
    max_amount: Annotated[str, typer.Option(
        "--max", metavar="AMOUNT", help="The most one payment may cost, in USDC.")] = DEFAULT_MAX,
    chains: Annotated[list[str] | None, typer.Option(
        "--chain", help="Allow this chain's USDC (repeatable): a name from the chain registry "
                        "or a CAIP-2 id.", show_default="[wallet] chain in config.toml, else base",
        autocompletion=complete.chains)] = None,
    tool: Annotated[str, typer.Option(
        "--tool", help="The tool the payment is billed under (the token's scope must cover it).",
        autocompletion=complete.tools)] = DEFAULT_TOOL,
    request_id: Annotated[str | None, typer.Option(
        "--request-id", help="Pay this request at most once across runs (the idempotency key "
                             "derives from it).", show_default="a new payment every run")] = None,
    as_json: JsonOption = False,
) -> None:
    """GET URL; on HTTP 402, pay the challenge from the agent's token, within --max.

    Example: mcpbill x402 fetch https://api.example.com/report --max 0.05 --dry-run
    """
    from mcpbill_cli.errors import InvalidInput
    from mcpbill_cli.verifier import Verifier
    from mcpbill_cli.x402 import AgentBudget
    from mcpbill_cli.x402 import fetch as fetch_url

    if not token:
        raise InvalidInput(f"say whose budget pays: --token JWT or {ENV_TOKEN}")
    st = state(ctx)
    verifier = Verifier.from_settings(st.settings, engine=st.engine())
    budget = AgentBudget(verifier, token, tool=tool)
    policy = _policy(st, chains, max_amount)
    signer = None if dry_run else _operator_account(st)
    try:
        result = fetch_url(url, budget=budget, policy=policy, signer=signer, dry_run=dry_run,
                           request_id=request_id)
    finally:
        verifier.close()  # seals the payment's events and writes refusal counts
    _refuse_http_error(result)
    emit(_result_data(result), as_json=as_json, human=lambda: _render(result))


def _refuse_http_error(result: FetchResult) -> None:
    """Fail on an HTTP error status as `curl --fail` does, so a script never takes an error
    page for the data it asked for: nothing goes to stdout, the error names the status. A dry
    run's 402 is the challenge it came to judge, not an error."""
    from mcpbill_cli.x402.errors import X402HttpError

    if result.status < 400 or (result.dry_run and result.status == 402):
        return
    receipt = result.outcome.receipt.receipt_id if result.outcome else None
    paid = f"; the payment settled first (receipt {receipt})" if receipt else ""
    raise X402HttpError(f"HTTP {result.status} from {result.url}{paid}", status=result.status,
                        url=result.url, receipt_id=receipt,
                        body_excerpt=result.body[:_EXCERPT_BYTES].decode("utf-8", "replace"))


def _result_data(result: FetchResult) -> dict[str, Any]:
    """The fetch as CLI data: snake_case throughout, the receipt as `receipt show` prints it."""
    data: dict[str, Any] = wire_to_cli(result.to_dict())
    if result.outcome is not None:
        data["receipt"] = receipt_data(result.outcome.receipt.to_dict())
    return data


def _policy(st: State, chains: list[str] | None, max_amount: str) -> PaymentPolicy:
    from mcpbill_cli.money import parse_usd
    from mcpbill_cli.wallet.chains import resolve_chain
    from mcpbill_cli.x402 import PaymentPolicy

    names: list[str | None] = list(chains) if chains else [None]  # None: the default chain
    chosen = [resolve_chain(name, st.settings.file) for name in names]
    return PaymentPolicy.for_chains(chosen, max_amount=parse_usd(max_amount, field="--max"))


def _operator_account(st: State) -> TypedDataSigner:
    """The operator's keystore wallet; the password from the environment or a prompt, asked
    only once the keystore is known to be there."""
    from mcpbill_cli.cli.prompts import secret
    from mcpbill_cli.wallet.keystore import (
        ENV_KEYSTORE_PASSWORD,
        keystore_address,
        keystore_path,
        load_account,
    )

    path = keystore_path(st.settings.keys_dir)
    keystore_address(path)  # NOT_FOUND (run `wallet create`) before any question
    return load_account(path, secret(ENV_KEYSTORE_PASSWORD, "keystore password"))


def _render(result: FetchResult) -> None:
    """Talk on stderr (requirements, decision, settlement); the body is the data, on stdout."""
    say(f"HTTP {result.status} from {result.url}")
    if result.decision is not None:
        show_listing(result.decision.verdicts, OPTION_COLUMNS, to_stderr=True)
    if result.dry_run and result.challenge is not None:
        say(_prediction(result))
    if result.outcome is not None:
        receipt = result.outcome.receipt
        say(f"paid {receipt.claims['amountUsd']} USDC: transaction "
            f"{result.outcome.settlement.transaction} on {receipt.claims['network']}; receipt "
            f"{receipt.receipt_id}; {receipt.claims['remainingUsd']} USDC left on the token")
    typer.echo(result.body.decode("utf-8", errors="replace"), nl=False)


def _option_amount(verdict: Any) -> str:
    from mcpbill_cli.money import format_usd

    requirement = verdict.offer.requirement
    return format_usd(requirement.amount) if requirement else "?"


OPTION_COLUMNS = (
    Column("#", lambda v: v.offer.index), Column("scheme", lambda v: v.offer.raw.get("scheme")),
    Column("network", lambda v: v.offer.raw.get("network")), Column("amount", _option_amount),
    Column("verdict", lambda v: "ok" if v.acceptable else v.explanation),
)


def _prediction(result: FetchResult) -> str:
    from mcpbill_cli.money import format_usd

    if result.refusal:
        return f"a fetch would refuse: {result.refusal['code']}: {result.refusal['message']}"
    choice = result.decision.choice if result.decision else None
    index = choice.offer.index if choice else "?"
    return (f"a fetch would pay option {index}; the token has "
            f"{format_usd(result.remaining or 0)} USDC left (dry run: nothing held or signed)")
