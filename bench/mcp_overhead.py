"""What billing adds to an MCP tool call: a billed trivial tool vs the same tool unbilled.

Both run on one ``MCPServer`` over the SDK's in-memory transport, with the real client, in the
same run: rounds alternate between the two so drift (CPU boost, caches) hits both alike. The
billed tool does the whole path on a SQLite ledger: begin (the token, scope and price checks
and the hold), run, capture, a signed receipt in ``_meta``. Prints the median time per call of
each and their ratio (target <= 1.5x), and billed / (unbilled + floor) (goal <= 1.25x),
and, in the same rounds:

- the same begin (hold) + capture called on the verifier directly, in a tight loop (no MCP, no
  threads). The rest of the billed call is the MCP glue (billing holds and captures in the
  worker thread the SDK runs the tool in, so no thread hop of its own; the receipt in
  ``_meta`` is serialized by the SDK and parsed by the client), and the verifier's own code
  running after an MCP call has left the CPU caches cold: the same instructions
  (``bench/instructions.py`` counts both), yet by thread CPU time begin and capture cost 1.05
  to 1.3 times as much inside a call as in the tight loop;
- to tell those two apart, the same begin + capture made by an unbilled tool itself (the
  verifier inside an MCP call, in the SDK's worker thread, with no billing code): billed minus
  that is the glue alone; that minus unbilled minus the tight loop is what running the
  verifier inside a call costs;
- a floor under any billing code on this ledger: the rows a billed call writes (two
  transactions: account updates, transfers, the call, one audit event each, appended with no
  chain: a sealer hashes it later) as hand-written SQL on the raw driver, plus the receipt's
  signature. One plus its share of an
  unbilled call is the lowest ratio this ledger's writes allow;
- the same floor written by an unbilled tool, inside an MCP call: whether the raw driver's
  writes cost more after the call's own work too (the verifier's code does), and billed over
  that tool, both inside a call.

Usage: python bench/mcp_overhead.py [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import anyio
import jwt
from mcp.client import Client
from mcp.server.mcpserver import MCPServer
from mcp_types import RequestParamsMeta

from mcpbill_cli.clock import utcnow
from mcpbill_cli.config import load_settings
from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger import credit
from mcpbill_cli.ledger.checkpoint import BACKSTOP_PAGES
from mcpbill_cli.ledger.engine import make_engine, writing
from mcpbill_cli.mcp import TOKEN_META, Billing
from mcpbill_cli.setup import initialize
from mcpbill_cli.verifier import Hold, Verifier

PRICING = """version = 1
[tools.echo]
price = "0.000001"
"""
# Every call asks something new: the same call again within echo's dedupe window would be a
# replay, which neither runs the tool nor bills it.
_CALL_NUMBERS = itertools.count()


def make_home(root: Path) -> Any:
    settings = load_settings(home=root, db_url=f"sqlite:///{root / 'ledger.db'}", mode="demo")
    initialize(settings, alg="EdDSA", mode="demo", force=False)
    settings.pricing_path.write_text(PRICING)
    return settings


def issue(settings: Any, limit: int) -> str:
    engine = make_engine(settings.db_url)
    with writing(engine) as conn:
        credit.fund_demo(conn, "bench", limit, now=utcnow())
        token = credit.issue(conn, credit.IssueRequest(
            tenant="bench", agent="bench", limit=limit, ttl=3600, scope=None,
            audience=settings.audience, issuer=settings.issuer, demo=True),
            signer=KeyRing.load(settings.keys_dir).signing_key(), ttl_cap=settings.ttl_cap,
            now=utcnow()).token
    engine.dispose()
    return token


def build_server(billing: Billing) -> MCPServer:
    server: MCPServer = MCPServer("bench", extensions=[billing], log_level="WARNING")

    @billing.tool(server)
    def echo(text: str) -> str:
        return text

    @server.tool()
    def echo_unbilled(text: str) -> str:
        return text

    return server


def add_self_billed(server: MCPServer, verifier: Verifier, token: str) -> None:
    """An unbilled echo that makes the billed echo's begin and capture itself: the verifier
    inside an MCP call, with none of the billing extension's code around it."""

    @server.tool()
    def echo_self_billed(text: str) -> str:
        hold = verifier.begin(token, "echo", args={"text": text})
        assert isinstance(hold, Hold) and hold.replayed is None
        verifier.capture(hold, result=_RESULT)
        return text


async def per_call(client: Client, tool: str, meta: RequestParamsMeta, calls: int) -> float:
    """Seconds per call of ``calls`` sequential calls, checking each one succeeded."""
    start = time.perf_counter()
    for _ in range(calls):
        result = await client.call_tool(tool, {"text": f"hello {next(_CALL_NUMBERS)}"},
                                        meta=meta)
        assert not result.is_error, result
    return (time.perf_counter() - start) / calls


_HOLD = (
    ("UPDATE accounts SET debits_pending = debits_pending + :amount WHERE id = :token "
     "AND closed = 0 AND credits_posted - debits_posted - debits_pending >= :amount"),
    "UPDATE accounts SET credits_pending = credits_pending + :amount WHERE id = :revenue",
    ("INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind, status, "
     "timeout_at, code, ref, demo, created_at) VALUES ('hold:' || :call, :token, :revenue, "
     ":amount, 'pending', 'pending', :later, 'hold', :call, 1, :now)"),
    ("INSERT INTO calls (id, idempotency_key, request_hash, jti, tenant, agent, tool, "
     "amount_held, status, timeout_at, pricing_version, price_rule, demo, created_at) VALUES "
     "(:call, :call, :digest, :jti, 'bench', 'bench', 'echo', :amount, 'held', :later, 1, "
     "'tools.echo', 1, :now)"),
)
_CAPTURE = (
    ("UPDATE calls SET status = 'captured', resolved_at = :now WHERE id = :call "
     "AND status = 'held' AND timeout_at > :now"),
    ("UPDATE transfers SET status = 'posted' WHERE id = 'hold:' || :call AND kind = 'pending' "
     "AND status = 'pending' AND timeout_at > :now"),
    ("INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind, pending_id, "
     "code, ref, demo, created_at) VALUES ('capture:' || :call, :token, :revenue, :amount, "
     "'post_pending', 'hold:' || :call, 'capture', :call, 1, :now)"),
    ("UPDATE accounts SET debits_posted = debits_posted + :amount, "
     "debits_pending = debits_pending - :amount WHERE id = :token"),
    ("UPDATE accounts SET credits_posted = credits_posted + :amount, "
     "credits_pending = credits_pending - :amount WHERE id = :revenue"),
)
# As audit.record appends: no chain, nothing shared (a sealer hashes it later, off the call).
_EVENT = ("INSERT INTO events (at, kind, jti, tenant, agent, tool, amount, ref, demo) "
          "VALUES (:now, :kind, :jti, 'bench', 'bench', 'echo', :amount, :call, 1)")


# What billing keeps of an echo's result for replays (the SDK's CallToolResult as JSON).
_RESULT = ('{"content":[{"type":"text","text":"hello 12345"}],'
           '"structuredContent":{"result":"hello 12345"},"isError":false,"resultType":"complete"}')


class LedgerWrites:
    """The floor under any billing code: the rows a billed call writes (hold: two account
    updates, a pending transfer, the call, an event; capture: the same again and the receipt),
    as hand-written SQL on the raw driver with its statement cache warm, one transaction each,
    plus the receipt's signature. No checks, no reads, nothing of mcpbill in the way.

    :meth:`alone` writes them in a tight loop; :meth:`one` a call's, from an unbilled tool
    (``echo_raw_floor``): the floor inside an MCP call, with the call's own work around it."""

    def __init__(self, path: Path, jti: str, sign: Callable[[bytes], bytes]) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")  # as the verifier's
        self.jti, self.sign = jti, sign
        self.ready: list[dict[str, Any]] = []  # rows made ahead, for :meth:`one`

    def rows(self, calls: int) -> list[dict[str, Any]]:
        now, jti = utcnow(), self.jti
        return [{"call": call, "token": f"token:{jti}", "revenue": f"revenue:{jti}", "jti": jti,
                 "amount": 1, "now": now.isoformat(" "),
                 "later": (now + timedelta(minutes=5)).isoformat(" "),
                 "digest": hashlib.sha256(call.encode()).hexdigest()}
                for call in (f"floor_{uuid.uuid4().hex}" for _ in range(calls))]

    def alone(self, calls: int) -> float:
        """Seconds per call of ``calls`` calls' rows, written back to back."""
        rows = self.rows(calls)
        start = time.perf_counter()
        for row in rows:
            self.write(row)
        return (time.perf_counter() - start) / calls

    def one(self) -> None:
        """One call's rows (made ahead by :meth:`prepare`)."""
        self.write(self.ready.pop())

    def prepare(self, calls: int) -> None:
        self.ready = self.rows(calls)

    def write(self, row: dict[str, Any]) -> None:
        db, call = self.db, str(row["call"])
        for kind, statements in (("hold", _HOLD), ("capture", _CAPTURE)):
            db.execute("BEGIN IMMEDIATE")
            for statement in statements:
                db.execute(statement, row)
            if kind == "capture":
                payload = call.encode() * 16  # a receipt: ~600 bytes of claims, signed
                receipt = base64.urlsafe_b64encode(payload + self.sign(payload)).decode()
                db.execute("UPDATE calls SET amount = 1, transfer_id = 'capture:' || :call, "
                           "receipt = :receipt, result = :result WHERE id = :call",
                           {**row, "receipt": receipt, "result": _RESULT})
            db.execute(_EVENT, {**row, "kind": kind})
            db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


def add_raw_floor(server: MCPServer, floor: LedgerWrites) -> None:
    """An unbilled echo that writes the floor's rows of one call itself."""

    @server.tool()
    def echo_raw_floor(text: str) -> str:
        floor.one()
        return text


def verifier_alone(verifier: Verifier, token: str, calls: int) -> float:
    """Seconds per call of what billing asks of the verifier, called directly: begin (a hold,
    for this paid tool), then capture."""
    start = time.perf_counter()
    for _ in range(calls):
        hold = verifier.begin(token, "echo", args={"text": f"hello {next(_CALL_NUMBERS)}"})
        assert isinstance(hold, Hold) and hold.replayed is None
        verifier.capture(hold, result=_RESULT)
    return (time.perf_counter() - start) / calls


async def measure(server: MCPServer, verifier: Verifier, token: str,
                  floor: LedgerWrites, calls: int, rounds: int) -> dict[str, float]:
    meta = cast(RequestParamsMeta, {TOKEN_META: token})
    times: dict[str, list[float]] = {"unbilled": [], "billed": [], "self_billed": [],
                                     "verifier": [], "floor": [], "floor_in_call": []}
    floor.prepare(20)
    async with Client(server) as client:
        await per_call(client, "echo", meta, 20)  # warm up the paths
        await per_call(client, "echo_unbilled", meta, 20)
        await per_call(client, "echo_self_billed", meta, 20)
        await per_call(client, "echo_raw_floor", meta, 20)
        for _ in range(rounds):
            times["unbilled"].append(await per_call(client, "echo_unbilled", meta, calls))
            times["billed"].append(await per_call(client, "echo", meta, calls))
            times["self_billed"].append(await per_call(client, "echo_self_billed", meta,
                                                       calls))
            times["verifier"].append(verifier_alone(verifier, token, calls))
            times["floor"].append(floor.alone(calls))
            floor.prepare(calls)
            times["floor_in_call"].append(await per_call(client, "echo_raw_floor", meta,
                                                         calls))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="billed vs unbilled MCP tool call")
    parser.add_argument("--calls", type=int, default=200, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mcpbill-bench-") as root:
        settings = make_home(Path(root))
        token = issue(settings, 10_000_000)
        verifier = Verifier.from_settings(settings)
        server = build_server(Billing(verifier))
        add_self_billed(server, verifier, token)
        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
        signer = KeyRing.load(settings.keys_dir).signing_key()[1]
        floor = LedgerWrites(Path(root) / "ledger.db", jti, signer.sign)
        add_raw_floor(server, floor)
        median = anyio.run(measure, server, verifier, token, floor, args.calls, args.rounds)
        floor.close()
        verifier.close()
    unbilled, billed, ledger = median["unbilled"], median["billed"], median["verifier"]
    floor_share = median["floor"] / unbilled
    print(f"in-memory transport, SQLite ledger, {args.rounds} rounds x {args.calls} calls")
    print(f"unbilled tool call                  {unbilled * 1000:8.3f} ms/call")
    print(f"billed tool call                    {billed * 1000:8.3f} ms/call")
    print(f"ratio billed / unbilled             {billed / unbilled:8.2f}x  (target <= 1.50x)")
    print(f"of which the verifier, called alone {ledger * 1000:8.3f} ms/call "
          "(begin: hold, then capture)")
    rest = billed - unbilled - ledger
    print(f"and the rest (glue, cold caches)      {rest * 1000:6.3f} ms/call")
    in_call = median["self_billed"] - unbilled - ledger
    print(f"  the verifier inside a call costs    {in_call * 1000:6.3f} ms/call more "
          "(an unbilled tool making the same begin + capture)")
    print(f"  the glue (billed - that tool)       {(billed - median['self_billed']) * 1000:6.3f}"
          " ms/call")
    print(f"floor: the same rows as raw SQL     {median['floor'] * 1000:8.3f} ms/call "
          f"= {floor_share:.2f} of an unbilled call,")
    print(f"       so billed / unbilled cannot go below {1 + floor_share:.2f}x on this ledger")
    print(f"billed / (unbilled + floor)         {billed / (unbilled + median['floor']):8.2f}x  "
          "(goal <= 1.25x)")
    in_call = median["floor_in_call"] - unbilled
    print(f"the floor inside a call              {in_call * 1000:6.3f} ms/call more than unbilled "
          "(an unbilled tool writing the same rows)")
    print(f"billed / that tool                  {billed / median['floor_in_call']:8.2f}x  "
          "(what billing costs over the least a billed call does, both inside a call)")


if __name__ == "__main__":
    main()
