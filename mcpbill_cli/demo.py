"""`mcpbill demo`: the whole loop on a throwaway home, in demo mode, no chain.

init -> fund $10 -> issue a $0.05 token -> paid calls until the budget runs out -> the
structured BUDGET_EXCEEDED an agent would read -> the ledger's invariants. The core returns
events; the CLI decides how they look.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcpbill_cli.clock import utcnow
from mcpbill_cli.config import LEDGER_FILE, load_settings
from mcpbill_cli.errors import BillingError

DEMO_FUNDS = 10_000_000
DEMO_LIMIT = 50_000
# (tool, args, units reported): a paid search, a free status, a per-unit summarize.
DEMO_CALLS = [("search", {"q": "usdc"}, None), ("status", {}, None),
              ("summarize", {"doc": 1}, 1200), ("search", {"q": "mcp"}, None)]


@dataclass(frozen=True)
class DemoStep:
    kind: str  # setup | receipt | refusal | summary
    text: str
    data: dict[str, Any]


def run_demo(home: Path) -> Iterator[DemoStep]:
    """Yield each step as it happens; the ledger under ``home`` is left for inspection."""
    from mcpbill_cli.ledger import credit, invariants
    from mcpbill_cli.ledger.engine import make_engine, reading, writing
    from mcpbill_cli.setup import initialize
    from mcpbill_cli.verifier import Verifier

    # Always a SQLite file in the demo home: a demo never writes into a configured ledger.
    settings = load_settings(home=home, db_url=f"sqlite:///{home / LEDGER_FILE}", mode="demo")
    init = initialize(settings, alg="EdDSA", mode="demo", force=False)
    yield DemoStep("setup", f"initialized {home} (ledger schema {init.schema})", {})
    engine = make_engine(settings.db_url)
    with writing(engine) as conn:
        credit.fund_demo(conn, "default", DEMO_FUNDS, now=utcnow())
        issued = credit.issue(conn, credit.IssueRequest(
            tenant="default", agent="demo-agent", limit=DEMO_LIMIT, ttl=3600, scope=None,
            audience=settings.audience, issuer=settings.issuer, demo=True),
            signer=_signer(settings.keys_dir), ttl_cap=settings.ttl_cap, now=utcnow())
    yield DemoStep("setup", f"funded $10.00 and issued {issued.claims.jti} with a $0.05 limit",
                   {"jti": issued.claims.jti})
    verifier = Verifier.from_settings(settings, engine=engine)
    yield from _spend(verifier, issued.token)
    with reading(engine) as conn:
        balance = credit.tenant_balance(conn, "default")
        problems = invariants.check(conn)
    yield DemoStep("summary", "ledger invariants hold" if not problems else
                   f"{len(problems)} invariant violation(s)",
                   {"balance": balance, "violations": problems})
    engine.dispose()


def _signer(keys_dir: Path) -> Any:
    from mcpbill_cli.keys import KeyRing

    return KeyRing.load(keys_dir).signing_key()


def _spend(verifier: Any, token: str) -> Iterator[DemoStep]:
    for round_no in range(100):
        for tool, args, units in DEMO_CALLS:
            try:
                with verifier.call(token, tool, args=args, request_id=f"{round_no}-{tool}",
                                   max_units=2000 if units else None) as billed:
                    if units:
                        billed.report_units(units)
            except BillingError as refusal:
                yield DemoStep("refusal", refusal.message, refusal.to_dict())
                return
            receipt = billed.receipt
            yield DemoStep("receipt", f"{tool}: charged {receipt.claims['amountUsd']}, "
                           f"{receipt.claims['remainingUsd']} left", receipt.to_dict())
