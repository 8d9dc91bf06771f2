"""One paid GET, for ``mcpbill x402 fetch``: the requirements, the decision and why, the settlement.

With ``dry_run`` nothing is held or signed: the 402 is read, every option judged, and the
agent's remaining budget compared with the chosen amount, so the operator sees what a real fetch
would do and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from mcpbill_cli.errors import BillingError, BudgetExceeded
from mcpbill_cli.money import format_usd
from mcpbill_cli.x402.billing import AgentBudget
from mcpbill_cli.x402.client import PaymentOutcome, X402Payer, X402Transport, payment_of
from mcpbill_cli.x402.errors import X402Unreachable
from mcpbill_cli.x402.policy import Decision, PaymentPolicy, choose, decide
from mcpbill_cli.x402.signing import TypedDataSigner
from mcpbill_cli.x402.wire import Challenge, parse_challenge

DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class FetchResult:
    """What a fetch saw and did. ``refusal`` is what a dry run predicts a real fetch would raise."""

    url: str
    status: int
    dry_run: bool
    challenge: Challenge | None
    decision: Decision | None
    outcome: PaymentOutcome | None
    remaining: int | None
    refusal: dict[str, Any] | None
    content_type: str | None
    body: bytes

    @property
    def paid(self) -> bool:
        return self.outcome is not None

    def to_dict(self) -> dict[str, Any]:
        outcome = self.outcome
        return {
            "url": self.url, "status": self.status, "dryRun": self.dry_run, "paid": self.paid,
            "challenge": self.challenge.to_dict() if self.challenge else None,
            "decision": self.decision.to_dict() if self.decision else None,
            "remainingUsd": None if self.remaining is None else format_usd(self.remaining),
            "refusal": self.refusal,
            "settlement": outcome.settlement.to_dict() if outcome else None,
            "receipt": outcome.receipt.to_dict() if outcome else None,
            "contentType": self.content_type,
            "body": self.body.decode("utf-8", errors="replace"),
        }


def fetch(url: str, *, budget: AgentBudget, policy: PaymentPolicy,
          signer: TypedDataSigner | None, dry_run: bool = False,
          request_id: str | int | None = None, timeout: float = DEFAULT_TIMEOUT,
          transport: httpx.BaseTransport | None = None) -> FetchResult:
    """GET ``url``, paying a 402 within the agent's budget (or, with ``dry_run``, only judging).

    Refusals are raised as BillingErrors, except in a dry run, which reports them instead.
    """
    budget.claims  # noqa: B018 - a bad token is refused before any request is sent
    if dry_run or signer is None:
        return _dry_run(url, budget, policy, timeout, transport)
    payer = X402Payer(budget, signer, policy, request_id=request_id)
    with httpx.Client(transport=X402Transport(payer, transport), timeout=timeout) as http:
        response = _get(http, url)
    outcome = payment_of(response)
    challenge = outcome.challenge if outcome else None
    return FetchResult(url, response.status_code, False, challenge,
                       decide(challenge, policy) if challenge else None, outcome,
                       outcome.receipt.remaining if outcome else None, None,
                       response.headers.get("content-type"), response.content)


def _get(http: httpx.Client, url: str) -> httpx.Response:
    """GET ``url``; a URL that cannot be reached is X402_UNREACHABLE, not a transport error."""
    try:
        return http.get(url)
    except (httpx.TransportError, httpx.InvalidURL) as exc:
        raise X402Unreachable(f"cannot reach {url}: {exc or type(exc).__name__}; check the URL "
                              "and that the server is up", url=url) from None


def _dry_run(url: str, budget: AgentBudget, policy: PaymentPolicy, timeout: float,
             transport: httpx.BaseTransport | None) -> FetchResult:
    with httpx.Client(transport=transport, timeout=timeout) as http:
        response = _get(http, url)
    remaining = budget.remaining()
    challenge = decision = refusal = None
    if response.status_code == 402:
        challenge = parse_challenge(response.headers, response.content)
        decision = decide(challenge, policy)
        refusal = _predicted_refusal(challenge, policy, budget, remaining)
    return FetchResult(url, response.status_code, True, challenge, decision, None, remaining,
                       refusal, response.headers.get("content-type"), response.content)


def _predicted_refusal(challenge: Challenge, policy: PaymentPolicy, budget: AgentBudget,
                       remaining: int) -> dict[str, Any] | None:
    try:
        amount = choose(challenge, policy).amount
    except BillingError as exc:
        return exc.to_dict()
    if amount <= remaining:
        return None
    return BudgetExceeded(
        f"the x402 payment costs {format_usd(amount)} USDC but this token has "
        f"{format_usd(remaining)} left", reason="token_limit", tool=budget.tool,
        priceUsd=format_usd(amount), remainingUsd=format_usd(remaining),
        shortfallUsd=format_usd(amount - remaining)).to_dict()
