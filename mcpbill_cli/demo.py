"""`mcpbill demo`: the whole loop on a throwaway home, in demo mode, no chain, over real MCP.

init -> fund $10 -> issue a $0.05 token -> start ``examples/paid_server.py`` as an MCP server
over stdio, with the token in its ``AGENT_CREDIT_JWT`` as an agent host would pass it -> call
its tools with the MCP client until the budget runs out, checking each receipt's signature
against the home's keys as an agent checks it against the server's JWKS -> the structured
BUDGET_EXCEEDED an agent reads, and follows: it keeps to the fallback tools that still fit,
until none does -> reconcile (totals, the ledger's invariants, the audit chain, every
receipt's signature).
The core yields steps; the CLI decides how they look.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcpbill_cli.clock import utcnow
from mcpbill_cli.config import (
    DEFAULT_TENANT,
    ENV_DB_URL,
    ENV_HOME,
    ENV_MODE,
    ENV_TOKEN,
    LEDGER_FILE,
    Settings,
    load_settings,
)
from mcpbill_cli.errors import NotFound

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal
    from mcp.client import Client
    from mcp_types import CallToolResult

    from mcpbill_cli.keys import VerificationKey

    Keys = dict[str, VerificationKey]

DEMO_FUNDS = 10_000_000
DEMO_LIMIT = 50_000
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# A source checkout has examples/ next to the package; a wheel can carry it inside the package.
EXAMPLE_SERVERS = (PACKAGE_ROOT / "examples" / "paid_server.py",
                   Path(__file__).resolve().parent / "examples" / "paid_server.py")
DEMO_TEXT = " ".join(["Agents pay for each MCP tool call in USDC from a prepaid, capped token."]
                     * 50)  # summarize is billed per word
# A paid search, a free status, a per-word summarize, another search; round after round. Each
# round asks something new: the same call again within its dedupe window is a retry, replayed
# and not billed (round one shows that once, by re-sending its first search).
DEMO_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("search", {"q": "usdc"}), ("status", {}), ("summarize", {"text": DEMO_TEXT}),
    ("search", {"q": "mcp"})]
MAX_ROUNDS = 100
CALL_TIMEOUT = 60  # seconds; a stuck server fails the demo instead of hanging it


@dataclass(frozen=True)
class DemoStep:
    kind: str  # setup | receipt | replay | free | refusal | fallback | summary
    text: str
    data: dict[str, Any]


def run_demo(home: Path) -> Generator[DemoStep, None, None]:
    """Yield each step as it happens; the ledger under ``home`` is left for inspection.

    Closing the generator early stops the MCP session and the server process cleanly.
    """
    from mcpbill_cli.setup import initialize

    started = utcnow()
    # Always a SQLite file in the demo home: a demo never writes into a configured ledger.
    settings = load_settings(home=home, db_url=f"sqlite:///{home / LEDGER_FILE}", mode="demo")
    init = initialize(settings, alg="EdDSA", mode="demo", force=False)
    yield DemoStep("setup", f"initialized {home} (ledger schema {init.schema})", {})
    token, jti = _fund_and_issue(settings)
    yield DemoStep("setup", f"funded $10.00 and issued {jti} with a $0.05 limit", {"jti": jti})
    yield from _agent_session(settings, token)
    yield _summary(settings, started)


def _fund_and_issue(settings: Settings) -> tuple[str, str]:
    from mcpbill_cli.keys import KeyRing
    from mcpbill_cli.ledger import credit
    from mcpbill_cli.ledger.engine import make_engine, writing

    engine = make_engine(settings.db_url)
    try:
        with writing(engine) as conn:
            credit.fund_demo(conn, DEFAULT_TENANT, DEMO_FUNDS, now=utcnow())
            issued = credit.issue(conn, credit.IssueRequest(
                tenant=DEFAULT_TENANT, agent="demo-agent", limit=DEMO_LIMIT, ttl=3600,
                scope=None, audience=settings.audience, issuer=settings.issuer, demo=True),
                signer=KeyRing.load(settings.keys_dir).signing_key(), ttl_cap=settings.ttl_cap,
                now=utcnow())
    finally:
        engine.dispose()
    return issued.token, issued.claims.jti


def _agent_session(settings: Settings, token: str) -> Iterator[DemoStep]:
    """Run the example server over stdio and call it, as an agent would, until refused."""
    from mcpbill_cli.keys import KeyRing

    keys = KeyRing.load(settings.keys_dir).verification_keys()
    try:
        from anyio.from_thread import start_blocking_portal
        from mcp.client import Client
        from mcp.client.stdio import stdio_client
    except ImportError:
        raise NotFound("the demo needs the MCP SDK: pip install 'mcpbill[mcp]'") from None
    parameters = _server_parameters(settings, token)
    # The portal runs the async MCP client in a thread, so this generator can yield each step
    # as it happens; the server's own log goes to a file in the demo home.
    with (settings.home / "server.log").open("a") as log, start_blocking_portal() as portal, \
            portal.wrap_async_context_manager(Client(
                stdio_client(parameters, errlog=log), read_timeout_seconds=CALL_TIMEOUT)) as client:
        try:
            yield from _calls(portal, client, keys)
        except GeneratorExit:
            return  # the caller stopped early: leave the block normally so the session closes


def _server_parameters(settings: Settings, token: str) -> Any:
    from mcp.client.stdio import StdioServerParameters

    env = {ENV_HOME: str(settings.home), ENV_DB_URL: settings.db_url, ENV_MODE: "demo",
           ENV_TOKEN: token, "PYTHONPATH": str(PACKAGE_ROOT)}
    return StdioServerParameters(command=sys.executable, args=[str(_example_server())], env=env)


def _example_server() -> Path:
    for path in EXAMPLE_SERVERS:
        if path.is_file():
            return path
    raise NotFound(f"the example server is missing (looked for {EXAMPLE_SERVERS[0]}); "
                   "`mcpbill demo` runs it from a source checkout of mcpbill")


def _calls(portal: BlockingPortal, client: Client, keys: Keys) -> Iterator[DemoStep]:
    from mcpbill_cli.mcp.wire import PRICE_META

    listed = portal.call(client.list_tools)
    prices = {tool.name: (tool.meta or {}).get(PRICE_META) for tool in listed.tools}
    yield DemoStep("setup", "started paid_server.py over stdio; its tools: "
                   + ", ".join(f"{name} {price['amountUsd'] if price else '?'}"
                               for name, price in prices.items()), {"tools": prices})
    yield from _replayed_retry(portal, client, keys)
    plan = DEMO_CALLS
    for number in range(2, MAX_ROUNDS + 2):
        for tool, args in plan:
            step = _step(tool, portal.call(client.call_tool, tool, _in_round(args, number)),
                         keys)
            yield step
            if step.kind == "refusal":
                plan = _fallback_plan(plan, step.data)
                if not plan:
                    return
                yield DemoStep("fallback", "the agent follows the hint and keeps to "
                               + ", ".join(sorted({tool for tool, _ in plan})), {})
                break


def _replayed_retry(portal: BlockingPortal, client: Client, keys: Keys
                    ) -> Iterator[DemoStep]:
    """Round one's first search, then the same call again, as an agent that lost the reply
    would send it: replayed, with the same receipt, billed once."""
    from mcpbill_cli.mcp.wire import REPLAYED_META

    tool, args = DEMO_CALLS[0]
    first = _step(tool, portal.call(client.call_tool, tool, _in_round(args, 1)), keys)
    yield first
    again = portal.call(client.call_tool, tool, _in_round(args, 1))
    step = _step(tool, again, keys)
    if step.kind == "receipt" and (again.meta or {}).get(REPLAYED_META):
        step = DemoStep("replay", f"{tool} re-sent: the first result and receipt again, "
                                  "not billed twice", step.data)
    yield step


def _in_round(args: dict[str, Any], number: int) -> dict[str, Any]:
    """The round's arguments: text arguments carry the round number."""
    return {name: f"{value} (round {number})" if isinstance(value, str) else value
            for name, value in args.items()}


def _fallback_plan(plan: list[tuple[str, dict[str, Any]]],
                   refusal: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The paid calls of ``plan`` that BUDGET_EXCEEDED's fallback hints say still fit."""
    fits = {hint["tool"] for hint in refusal.get("fallback", {}).get("tools", [])}
    return [(tool, args) for tool, args in plan if tool in fits]


def _step(tool: str, result: CallToolResult, keys: Keys) -> DemoStep:
    """What the agent got back: a receipt, a free result, or a refusal read from the text.

    A receipt's fields are read from its JWS once the signature verifies (INVALID_RECEIPT
    otherwise), not from the unsigned copy beside it in ``_meta``."""
    from mcpbill_cli.mcp.wire import RECEIPT_META
    from mcpbill_cli.receipts import verify_receipt

    if result.is_error:
        text = getattr(result.content[0], "text", "") if result.content else ""
        error = _json_object(text) or {"code": "TOOL_ERROR", "message": text}
        return DemoStep("refusal", str(error.get("message", text)), error)
    sent = (result.meta or {}).get(RECEIPT_META)
    if sent is None:
        return DemoStep("free", f"{tool}: free, nothing charged", {"tool": tool})
    receipt = verify_receipt(sent["jws"], keys).to_dict()
    return DemoStep("receipt", f"{tool}: charged {receipt['amountUsd']}, "
                    f"{receipt['remainingUsd']} left; signature verified", receipt)


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _summary(settings: Settings, started: datetime) -> DemoStep:
    """Reconcile everything the demo did, receipts and audit chain included."""
    from mcpbill_cli.ledger import credit
    from mcpbill_cli.ledger.engine import make_engine, reading
    from mcpbill_cli.money import format_usd
    from mcpbill_cli.reconcile import ReconcileOptions, Window, reconcile

    window = Window(started, utcnow() + timedelta(seconds=1))  # the end is excluded
    engine = make_engine(settings.db_url)
    try:
        with reading(engine) as conn:
            balance = credit.tenant_balance(conn, DEFAULT_TENANT)
        report = reconcile(engine, ReconcileOptions(
            window=window, chain="full", verify_receipts=True, keys_dir=settings.keys_dir))
    finally:
        engine.dispose()
    totals = report.summary
    found = "no findings" if not report.findings else f"{len(report.findings)} finding(s)"
    return DemoStep("summary", f"reconciled: {totals.captured} calls charged "
                    f"{format_usd(totals.charged)} USDC, {totals.voided} voided, "
                    f"{sum(totals.refusals.values())} refused; {found}", {
                        "balance": balance, "violations": list(report.findings),
                        "reconcile": {"calls": totals.calls, "captured": totals.captured,
                                      "chargedUsd": format_usd(totals.charged),
                                      "voided": totals.voided,
                                      "refusals": dict(totals.refusals),
                                      "checks": list(report.checks)}})
