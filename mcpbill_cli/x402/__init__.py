"""The downstream x402 challenge resolver (extra ``[x402]``): pay HTTP 402 within an agent's budget.

A paid tool that calls a paid API pays its x402 challenge itself, but never beyond the budget
of the agent whose call it serves, never twice for one request, and never an asset, network or
amount the operator did not allow::

    from mcpbill_cli.x402 import AgentBudget, PaymentPolicy, X402Payer, X402Transport

    budget = AgentBudget(verifier, agent_token, tool="search")
    policy = PaymentPolicy.for_chains([chain], max_amount=50_000)   # 0.05 USDC a call
    payer = X402Payer(budget, load_account(keystore, password), policy, request_id=mcp_id)
    with httpx.Client(transport=X402Transport(payer)) as http:
        response = http.get(url)                 # pays a 402 once, within the budget
    receipt = payment_of(response).receipt       # records the settlement transaction

Importing this package loads httpx, the verifier and the ledger, but not web3; the CLI imports
it inside ``mcpbill x402`` command bodies only.
"""

from mcpbill_cli.x402.billing import AgentBudget
from mcpbill_cli.x402.client import (
    IDEMPOTENCY_KEY,
    AsyncX402Transport,
    PaymentOutcome,
    X402Payer,
    X402Transport,
    payment_of,
)
from mcpbill_cli.x402.errors import (
    X402AlreadyPaid,
    X402BadChallenge,
    X402Error,
    X402NoAcceptableOption,
    X402OverMaximum,
    X402SettlementFailed,
)
from mcpbill_cli.x402.fetch import FetchResult, fetch
from mcpbill_cli.x402.policy import AllowedAsset, Choice, Decision, PaymentPolicy, choose, decide
from mcpbill_cli.x402.wire import Challenge, Requirement, Settlement, parse_challenge

__all__ = [
    "IDEMPOTENCY_KEY",
    "AgentBudget",
    "AllowedAsset",
    "AsyncX402Transport",
    "Challenge",
    "Choice",
    "Decision",
    "FetchResult",
    "PaymentOutcome",
    "PaymentPolicy",
    "Requirement",
    "Settlement",
    "X402AlreadyPaid",
    "X402BadChallenge",
    "X402Error",
    "X402NoAcceptableOption",
    "X402OverMaximum",
    "X402Payer",
    "X402SettlementFailed",
    "X402Transport",
    "choose",
    "decide",
    "fetch",
    "parse_challenge",
    "payment_of",
]
