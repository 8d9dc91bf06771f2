"""Reconcile a busy day: time and peak memory against a bare GROUP BY over the same rows.

For each backend (SQLite file, PostgreSQL database) and each size (100k and ``--rows``, default
1,000,000 calls in one UTC day), the script builds a ledger with bulk INSERTs in exactly the
shape the verifier writes (calls with their signed receipts, transfers, the audit events sealed
in signed batches of 5,000 as a sealer seals them, the refusals of garbage counted per minute,
accounts whose sums match, tokens, deposits, the pricing version), then times, each in
a fresh subprocess, against a bare ``SELECT tool, count(*), sum(amount) FROM calls WHERE
created_at in the day GROUP BY tool`` over the same rows (best of three):

- ``window``: the day's own checks (``--window-only --chain off``): totals, prices, control
  totals, revocation and expiry, events against transfers, stale holds, deposits: SQL
  aggregates and anti-joins only;
- ``sql``: plus the ledger-wide invariants (here from the first transfer: the ledger holds
  just this day and no snapshot), and the snapshot of the sums it leaves at the day's end;
- ``default``: ``mcpbill reconcile --date`` as it runs, which the goal (at most 2x its floor,
  below) is for: plus
  the seals holding the day's events checked (links, hashes, signatures) and every event of
  them re-hashed against its seal's batch hash (SQLite: in Python, ``--jobs`` processes;
  PostgreSQL: in SQL, Python only for the seals SQL cannot vouch for);
- ``receipts``: plus ``--verify-receipts`` (every Ed25519 receipt signature and its fields),
  reported also as calls verified per second;

and the peak RSS of each run (``ru_maxrss`` of its subprocess): it must not grow with rows.
Each run first deletes the snapshot a run before left at the day's end, so all do the same.

Then the history measure (``--history-days``, default 10): a ledger of that many earlier days
of ``--rows`` calls each (their own tokens, the tenants funded again each day) and the same
day last, its earlier days reconciled in order first (the first from the full history, each
leaving the snapshot the next starts from); that last day's ``default`` reconcile against the
same day in the ledger above (no history), best of three each. Reconcile is incremental when
the ratio stays near 1 (target <= 1.2) however many days came before.
Last, a floor for ``default``: one SHA-256 per event of the day over its hashed fields joined
as text by the database (in SQL on PostgreSQL; read into Python on SQLite, which has no
SHA-256), against the same bare query. Verifying the seals re-hashes every event's content
in an exact canonical form, so ``default`` cannot cost less than this floor. Beside it, the
match: each of the day's events that moves money matched to its transfer, one to one, as one
raw GROUP BY over both (``event_transfers``' query, with nothing around it). A reconcile must do
both (the issue's checks match events to transfers), so the floor and the match one after the
other are printed against ``default`` too: what bounds it before any other check runs.

Every receipt is a real JWS signed over its own call's claims (in a process pool while
generating; a reused pool of receipts would not match their calls, and reconcile would rightly
report them). A run that reports any finding stops the bench: the generated day must be clean.

Usage: python bench/reconcile.py [--rows N] [--backend sqlite|postgres|both] [--jobs J]
       [--no-receipts] [--modes window,sql,default] [--data DIR] [--only-rows] [--profile]
       [--history-days N]

``--data DIR`` keeps the generated ledgers (a SQLite file in DIR, a PostgreSQL database named
after the row count, and the key ring that signed their receipts) and reuses them on the next
run: generating a million calls takes minutes. ``--profile`` prints each run's time per phase.
The seals are signed with that key ring's key, so reconcile checks their signatures too.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from operator import methodcaller
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Engine, Table, delete, text
from sqlalchemy.engine import make_url

from mcpbill_cli.keys import KeyRing, init_keyring
from mcpbill_cli.ledger.audit import GENESIS, event_digest
from mcpbill_cli.ledger.engine import make_engine
from mcpbill_cli.ledger.models import (
    account_snapshots,
    accounts,
    calls,
    events,
    ledger_snapshots,
    pricing_versions,
    refusal_counts,
    seals,
    tokens,
    transfers,
)
from mcpbill_cli.ledger.schema import upgrade
from mcpbill_cli.ledger.seal_money import named_transfer, sum_money
from mcpbill_cli.ledger.seals import BATCH_LIMIT, Seal, Sign, batch_hash, signer
from mcpbill_cli.money import format_usd
from mcpbill_cli.pricing import PricingTable, document_digest
from mcpbill_cli.reconcile import event_transfers

PG_ADMIN = os.environ.get("MCPBILL_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DAY = date(2026, 11, 27)
SEED = 20261127
TENANTS = 10
TOKENS_PER_TENANT = 100
AGENTS_PER_TENANT = 20
HOLD_TIMEOUT = 300
PRICING_DOC: dict[str, Any] = {
    "version": 1,
    "default_price": "0.01",
    "tools": {
        "search": {"price": "0.01"},
        "translate": {"price": "0.05"},
        "status": {"price": "0"},
        "summarize": {"price_per_unit": "0.00001", "max_price": "0.50"},
    },
}
FIXED = {"search": 10_000, "translate": 50_000, "status": 0}
PER_UNIT, MAX_PRICE = 10, 500_000
TOOL_WEIGHTS = [("search", 60), ("translate", 15), ("status", 10), ("summarize", 15)]
# How calls end: charged at once, held then captured, voided, or expired by the sweeper.
OUTCOME_WEIGHTS = [("charge", 94), ("capture", 3), ("void", 2), ("expire", 1)]
REFUSAL_CODES = ["BUDGET_EXCEEDED", "SCOPE_DENIED", "INVALID_CREDIT_TOKEN", "PRICE_UNKNOWN"]
REFUSALS_PER_CALL = 0.005
GARBAGE_PER_MINUTE = 40  # refusals of tokens nobody signed: counted, not events
CHUNK = 20_000


# --- the generated day ----------------------------------------------------------------------


@dataclass
class Token:
    jti: str
    tenant: str
    agent: str
    spent: int = 0
    limit: int = 0


@dataclass
class Call:
    """One call as the verifier leaves it, with the moments its transfers were written."""

    id: str
    token: Token
    tool: str
    outcome: str
    at: datetime
    units: int | None
    amount_held: int
    amount: int | None  # posted

    @property
    def resolved_at(self) -> datetime:
        if self.outcome == "charge":
            return self.at
        if self.outcome == "expire":
            return self.at + timedelta(seconds=HOLD_TIMEOUT + 7)
        return self.at + timedelta(milliseconds=350)


@dataclass
class Day:
    """The deterministic plan of a day: its tokens, then its calls, generated twice from a seed
    (once to total each token's spend so limits fit, once to write) instead of kept in memory.
    """

    rows: int
    day: date = DAY
    start: datetime = field(init=False)
    tokens: list[Token] = field(init=False)

    def __post_init__(self) -> None:
        self.start = datetime(self.day.year, self.day.month, self.day.day, tzinfo=UTC)
        rng = random.Random(self.seed)
        self.tokens = [
            Token(jti=f"tok_{uuid.UUID(int=rng.getrandbits(128)).hex[:22]}",
                  tenant=f"tenant-{t}", agent=f"agent-{t}-{rng.randrange(AGENTS_PER_TENANT)}")
            for t in range(TENANTS) for _ in range(TOKENS_PER_TENANT)]
        for call in self.calls():
            if call.amount:
                call.token.spent += call.amount
        for token in self.tokens:
            token.limit = token.spent + 5 * 10**6

    @property
    def seed(self) -> int:
        """Each day its own tokens and calls; the same day the same in every ledger."""
        return SEED + 1000 * (self.day - DAY).days

    @property
    def setup_at(self) -> datetime:
        return self.start + timedelta(seconds=1)

    def calls(self) -> Iterator[Call]:
        rng = random.Random(self.seed + 1)
        tools = [name for name, weight in TOOL_WEIGHTS for _ in range(weight)]
        outcomes = [name for name, weight in OUTCOME_WEIGHTS for _ in range(weight)]
        # Calls spread over the day after setup, ending an hold timeout before midnight.
        span = (86_400 - 2 * HOLD_TIMEOUT - 10) * 10**6
        step = span // self.rows
        for n in range(self.rows):
            at = self.setup_at + timedelta(seconds=1, microseconds=n * step)
            token = self.tokens[rng.randrange(len(self.tokens))]
            tool = tools[rng.randrange(len(tools))]
            outcome = outcomes[rng.randrange(len(outcomes))]
            units = rng.randrange(1, 80_000) if tool == "summarize" else None
            held, posted = _amounts(tool, outcome, units)
            yield Call(id=f"rcpt_{uuid.UUID(int=rng.getrandbits(128)).hex[:24]}", token=token,
                       tool=tool, outcome=outcome, at=at, units=units, amount_held=held,
                       amount=posted)


def _amounts(tool: str, outcome: str, units: int | None) -> tuple[int, int | None]:
    if tool in FIXED:
        price = FIXED[tool]
        return price, price if outcome in ("charge", "capture") else None
    assert units is not None
    used = min(units * PER_UNIT, MAX_PRICE)
    if outcome == "charge":
        return used, used
    return MAX_PRICE, used if outcome == "capture" else None


# --- rows in the verifier's shape -----------------------------------------------------------


def _transfer(id: str, debit: str, credit: str, amount: int, kind: str, code: str,
              at: datetime, *, ref: str | None, status: str | None = None,
              pending_id: str | None = None, timeout_at: datetime | None = None,
              demo: bool = False) -> dict[str, Any]:
    return {"id": id, "debit_account_id": debit, "credit_account_id": credit, "amount": amount,
            "kind": kind, "pending_id": pending_id, "status": status, "timeout_at": timeout_at,
            "code": code, "ref": ref, "demo": demo, "created_at": at}


def call_transfers(call: Call) -> list[dict[str, Any]]:
    account, revenue = f"token:{call.token.jti}", f"revenue:{call.token.jti}"
    if call.outcome == "charge":
        assert call.amount is not None
        return [_transfer(f"charge:{call.id}", account, revenue, call.amount, "posted",
                          "charge", call.at, ref=call.id)]
    status = {"capture": "posted", "void": "voided", "expire": "expired"}[call.outcome]
    timeout = call.at + timedelta(seconds=HOLD_TIMEOUT)
    hold = _transfer(f"hold:{call.id}", account, revenue, call.amount_held, "pending", "hold",
                     call.at, ref=call.id, status=status, timeout_at=timeout)
    code = call.outcome
    amount = call.amount if call.outcome == "capture" else call.amount_held
    assert amount is not None
    kind = "post_pending" if call.outcome == "capture" else "void_pending"
    return [hold, _transfer(f"{code}:{call.id}", account, revenue, amount, kind, code,
                            call.resolved_at, ref=call.id, pending_id=f"hold:{call.id}")]


def call_row(call: Call, receipt: str | None) -> dict[str, Any]:
    status = {"charge": "captured", "capture": "captured", "void": "voided",
              "expire": "expired"}[call.outcome]
    transfer = {"charge": f"charge:{call.id}", "capture": f"capture:{call.id}"}.get(call.outcome)
    timeout = None if call.outcome == "charge" else call.at + timedelta(seconds=HOLD_TIMEOUT)
    return {"id": call.id, "idempotency_key": f"drv_{call.id[5:]}", "request_hash": "0" * 64,
            "jti": call.token.jti, "tenant": call.token.tenant, "agent": call.token.agent,
            "tool": call.tool, "units": call.units, "amount_held": call.amount_held,
            "amount": call.amount, "status": status, "transfer_id": transfer,
            "timeout_at": timeout, "pricing_version": 1,
            "price_rule": f"tools.{call.tool}", "receipt": receipt, "demo": False,
            "created_at": call.at, "resolved_at": call.resolved_at}


def receipt_claims(call: Call, remaining: int) -> dict[str, Any]:
    """The claims ``Verifier._sign`` puts in a receipt."""
    assert call.amount is not None
    transaction = f"{'charge' if call.outcome == 'charge' else 'capture'}:{call.id}"
    return {"success": True, "transaction": transaction, "network": "mcpbill:ledger",
            "payer": call.token.agent, "amount": str(call.amount), "receiptId": call.id,
            "tool": call.tool, "amountUsd": format_usd(call.amount), "asset": "USDC",
            "jti": call.token.jti, "tenant": call.token.tenant,
            "idempotencyKey": f"drv_{call.id[5:]}", "remainingUsd": format_usd(remaining),
            "pricingVersion": 1, "priceRule": f"tools.{call.tool}", "demo": False,
            "timestamp": call.resolved_at.isoformat().replace("+00:00", "Z")}


def call_events(call: Call) -> list[dict[str, Any]]:
    base = {"code": None, "jti": call.token.jti, "token_hash": None,
            "tenant": call.token.tenant, "agent": call.token.agent, "tool": call.tool,
            "ref": call.id, "detail": None, "demo": False}
    if call.outcome == "charge":
        return [{**base, "at": call.at, "kind": "charge", "amount": call.amount}]
    return [{**base, "at": call.at, "kind": "hold", "amount": call.amount_held},
            {**base, "at": call.resolved_at, "kind": call.outcome,
             "amount": call.amount if call.outcome == "capture" else call.amount_held}]


def refusal_event(token: Token, at: datetime, code: str) -> dict[str, Any]:
    detail = json.dumps({"reason": "expired"}) if code == "INVALID_CREDIT_TOKEN" else None
    return {"at": at, "kind": "refusal", "code": code, "jti": token.jti, "token_hash": None,
            "tenant": token.tenant, "agent": token.agent, "tool": "search", "amount": None,
            "ref": None, "detail": detail, "demo": False}


# --- signing receipts in parallel -----------------------------------------------------------

_SIGNER: tuple[str, Any] | None = None


def _load_signer(keys_dir: str) -> None:
    global _SIGNER
    info, key = KeyRing.load(Path(keys_dir)).signing_key()
    assert info.alg == "EdDSA", "the bench signs with its own Ed25519 key ring"
    header = json.dumps({"alg": "EdDSA", "kid": info.kid, "typ": "mcpbill-receipt+jwt"},
                        separators=(",", ":"))
    _SIGNER = (_b64(header.encode()), key)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign_all(claims: list[dict[str, Any]]) -> list[str]:
    """Compact JWS (EdDSA), as PyJWT builds them; cryptography directly, to sign 1M quickly."""
    assert _SIGNER is not None
    header, key = _SIGNER
    signed = []
    for claim in claims:
        body = f"{header}.{_b64(json.dumps(claim, separators=(',', ':')).encode())}"
        signed.append(f"{body}.{_b64(key.sign(body.encode()))}")
    return signed


# --- writing --------------------------------------------------------------------------------


def _sqlite_value(value: Any) -> Any:
    """What SQLAlchemy's SQLite types store: naive UTC text for datetimes, 0/1 for booleans."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, bool):
        return int(value)
    return value


class Writer:
    """Bulk inserts with the raw driver (COPY on PostgreSQL, executemany on SQLite). Events get
    their ids here, in the order written, and are sealed as a sealer would seal them: each
    with its own hash (``audit.event_digest``), in batches of ``BATCH_LIMIT`` in id order,
    each batch a seal row linked to the one before and signed with ``sign``."""

    def __init__(self, engine: Engine, sign: Sign) -> None:
        self.engine = engine
        self.sign = sign
        self.last_id = 0
        self.batch: list[tuple[int, str, datetime]] = []  # (id, own hash, at) not yet sealed
        self.seal_number = 0
        self.prev_hash = GENESIS
        self.moved: dict[str, dict[str, Any]] = {}  # transfers written, until an event names one
        self.named: list[Any] = []  # the transfers the batch's events name

    def rows(self, table: Table, rows: Sequence[dict[str, Any]]) -> None:
        if table is transfers:  # what the events about to be written name, for their seals
            self.moved.update((row["id"], row) for row in rows)
        if not rows:
            return
        names = list(rows[0])
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            if self.engine.dialect.name == "postgresql":
                with cursor.copy(f"COPY {table.name} ({', '.join(names)}) FROM STDIN"
                                 ) as copy:  # type: ignore[attr-defined]
                    for row in rows:
                        copy.write_row([row[n] for n in names])
            else:
                cursor.execute("BEGIN IMMEDIATE")
                cursor.executemany(
                    f"INSERT INTO {table.name} ({', '.join(names)}) "
                    f"VALUES ({', '.join('?' for _ in names)})",
                    [[_sqlite_value(row[n]) for n in names] for row in rows])
            raw.commit()
        finally:
            raw.close()

    def events(self, batch: Sequence[dict[str, Any]]) -> None:
        sealed, made = [], []
        for event in batch:
            self.last_id += 1
            digest = event_digest({**event, "id": self.last_id})
            self.batch.append((self.last_id, digest, event["at"]))
            named = named_transfer(event["kind"], event.get("ref"), event.get("jti"))
            if named is not None and named in self.moved:
                self.named.append(SimpleNamespace(**self.moved.pop(named)))
            sealed.append({**event, "id": self.last_id, "seal": self.seal_number + 1,
                           "hash": digest})
            if len(self.batch) == BATCH_LIMIT:
                made.append(self._seal())
        self.rows(events, sealed)
        self.rows(seals, made)

    def close_trail(self) -> None:
        """Seal what is left (a last, smaller batch)."""
        if self.batch:
            self.rows(seals, [self._seal()])

    def _seal(self) -> dict[str, Any]:
        """The next seal's row over ``self.batch``, as ``seals.seal_pending`` writes it."""
        self.seal_number += 1
        ids = [event_id for event_id, _, _ in self.batch]
        sealed_at = max(at for _, _, at in self.batch) + timedelta(seconds=1)
        unhashed = Seal(self.seal_number, ids[0], ids[-1], len(ids),
                        batch_hash([digest for _, digest, _ in self.batch]), self.prev_hash, "",
                        sealed_at, "", "", sum_money(self.named))
        fields = {k: v for k, v in unhashed.claims().items() if k != "hash"}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":"))
                                .encode()).hexdigest()
        kid, jws = self.sign({**fields, "hash": digest})
        self.batch, self.prev_hash, self.named = [], digest, []
        assert unhashed.money is not None  # noqa: S101 - set above
        return {"money": unhashed.money.to_json(), "number": unhashed.number,
                "first_id": unhashed.first_id,
                "last_id": unhashed.last_id, "count": unhashed.count,
                "batch_hash": unhashed.batch_hash, "prev_hash": unhashed.prev_hash,
                "hash": digest, "sealed_at": sealed_at, "kid": kid, "jws": jws}


def generate(engine: Engine, rows: int, keys_dir: Path, *, jobs: int,
             days: Sequence[date] = (DAY,)) -> None:
    """Write clean days of ``rows`` calls each (each day its own tokens, the tenants funded
    again) into a migrated, empty ledger; the trail is sealed through them, each day's last
    seal holding no event of the next.

    Receipts of one batch are signed in worker processes while the batch before is written.
    """
    info, key = KeyRing.load(keys_dir).signing_key()
    writer = Writer(engine, signer(info.alg, info.kid, key))
    with ProcessPoolExecutor(jobs, initializer=_load_signer, initargs=(str(keys_dir),)) as pool:
        for n, when in enumerate(days):
            _write_day(writer, Day(rows, when), keys_dir, pool, jobs, first=n == 0)
            # A sealer seals every second: no seal spans a midnight by more than that.
            writer.close_trail()
    _write_accounts(writer)


def _write_day(writer: Writer, day: Day, keys_dir: Path, pool: ProcessPoolExecutor, jobs: int,
               *, first: bool) -> None:
    _write_setup(writer, day, keys_dir, first=first)
    remaining = {token.jti: token.limit for token in day.tokens}
    rng = random.Random(day.seed + 2)
    pending: tuple[list[Call], list[Future[list[str]]]] | None = None
    for batch in _batches(day.calls()):
        signing = _submit_signing(pool, batch, remaining, jobs)
        if pending is not None:
            _write_batch(writer, *pending, rng)
        pending = (batch, signing)
    if pending is not None:
        _write_batch(writer, *pending, rng)
    _write_garbage_counts(writer, day, rng)


def _batches(calls_: Iterator[Call]) -> Iterator[list[Call]]:
    batch: list[Call] = []
    for call in calls_:
        batch.append(call)
        if len(batch) == CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch


def _submit_signing(pool: ProcessPoolExecutor, batch: list[Call], remaining: dict[str, int],
                    jobs: int) -> list[Future[list[str]]]:
    claims = []
    for call in batch:
        if call.amount is not None:
            remaining[call.token.jti] -= call.amount
            claims.append(receipt_claims(call, remaining[call.token.jti]))
    size = len(claims) // jobs + 1
    return [pool.submit(_sign_all, claims[i:i + size]) for i in range(0, len(claims), size)]


def _write_setup(writer: Writer, day: Day, keys_dir: Path, *, first: bool) -> None:
    if first:
        document = PricingTable.from_document(PRICING_DOC).to_document()
        writer.rows(pricing_versions, [{"version": 1, "recorded_at": day.setup_at,
                                        "document": json.dumps(document, sort_keys=True),
                                        "digest": document_digest(document)}])
    kid = KeyRing.load(keys_dir).active().kid
    writer.rows(tokens, [{
        "jti": t.jti, "tenant": t.tenant, "agent": t.agent, "kid": kid, "scope": '["*"]',
        "audience": "mcpbill", "parent_jti": None, "limit_micro": t.limit,
        "issued_at": day.setup_at, "expires_at": day.setup_at + timedelta(hours=24),
        "revoked_at": None, "revoke_reason": None, "demo": False} for t in day.tokens])
    moves, trail = [], []
    for tenant, funded in _tenant_funding(day).items():
        deposit = f"deposit:demo:{tenant}" + ("" if day.day == DAY else f":{day.day}")
        moves.append(_transfer(deposit, "chain:demo", f"tenant:{tenant}", funded, "posted",
                               "deposit", day.setup_at, ref="demo", demo=True))
        trail.append({"at": day.setup_at, "kind": "deposit", "code": None, "jti": None,
                      "token_hash": None, "tenant": tenant, "agent": None, "tool": None,
                      "amount": funded, "ref": deposit, "detail": None, "demo": True})
    for t in day.tokens:
        moves.append(_transfer(f"allot:{t.jti}", f"tenant:{t.tenant}", f"token:{t.jti}",
                               t.limit, "posted", "allot", day.setup_at, ref=t.jti))
        trail.append({"at": day.setup_at, "kind": "issue", "code": None, "jti": t.jti,
                      "token_hash": None, "tenant": t.tenant, "agent": t.agent, "tool": None,
                      "amount": t.limit, "ref": None, "detail": None, "demo": False})
    _write_accounts_skeleton(writer, day, first=first)
    writer.rows(transfers, moves)
    writer.events(trail)


def _tenant_funding(day: Day) -> dict[str, int]:
    funding: dict[str, int] = {}
    for t in day.tokens:
        funding[t.tenant] = funding.get(t.tenant, 0) + t.limit
    return {tenant: amount + 100 * 10**6 for tenant, amount in funding.items()}


def _write_batch(writer: Writer, batch: list[Call], signing: list[Future[list[str]]],
                 rng: random.Random) -> None:
    signed = iter([jws for future in signing for jws in future.result()])
    writer.rows(calls, [call_row(c, next(signed) if c.amount is not None else None)
                        for c in batch])
    writer.rows(transfers, [t for c in batch for t in call_transfers(c)])
    trail = [e for c in batch for e in call_events(c)]
    trail += [refusal_event(c.token, c.at, rng.choice(REFUSAL_CODES))
              for c in batch if rng.random() < REFUSALS_PER_CALL]
    writer.events(sorted(trail, key=lambda e: e["at"]))


def _write_garbage_counts(writer: Writer, day: Day, rng: random.Random) -> None:
    """Refusals of tokens nobody signed, as verifiers count them: one row a minute."""
    minutes = int((timedelta(days=1) - (day.setup_at - day.start)).total_seconds()) // 60
    writer.rows(refusal_counts, [
        {"minute": day.start + timedelta(minutes=n + 1), "code": "INVALID_CREDIT_TOKEN",
         "reason": "malformed", "source": "bench", "count": rng.randrange(1, GARBAGE_PER_MINUTE),
         "sample": "ab" * 32} for n in range(minutes - 1)])


def _write_accounts_skeleton(writer: Writer, day: Day, *, first: bool) -> None:
    """Every account at zero first (transfers reference them); sums are set at the end. The
    chain's and the tenants' accounts come with the first day, each day its tokens'."""
    ids = [("chain:demo", "chain", False)] if first else []
    ids += [(f"tenant:{t}", "tenant", True) for t in sorted({t.tenant for t in day.tokens})
            if first]
    ids += [(f"token:{t.jti}", "token", True) for t in day.tokens]
    ids += [(f"revenue:{t.jti}", "revenue", False) for t in day.tokens]
    writer.rows(accounts, [{"id": i, "kind": kind, "guarded": guarded, "closed": False,
                            "debits_posted": 0, "credits_posted": 0, "debits_pending": 0,
                            "credits_pending": 0, "created_at": day.setup_at}
                           for i, kind, guarded in ids])


def _write_accounts(writer: Writer) -> None:
    """Each account's posted sums, as the transfers written add them up (all holds resolved)."""
    posted = "transfers.kind IN ('posted', 'post_pending')"
    with writer.engine.begin() as conn:
        conn.execute(text(
            "UPDATE accounts SET"
            " debits_posted = (SELECT coalesce(sum(amount), 0) FROM transfers"
            f" WHERE transfers.debit_account_id = accounts.id AND {posted}),"
            " credits_posted = (SELECT coalesce(sum(amount), 0) FROM transfers"
            f" WHERE transfers.credit_account_id = accounts.id AND {posted})"))


# --- databases ------------------------------------------------------------------------------

KEYS_DIR = Path()


def fresh_database(backend: str, workdir: Path, label: str, *, keep: bool) -> str:
    """An empty database (``keep``: one named after ``label`` that a later run reuses)."""
    if backend == "sqlite":
        return f"sqlite:///{workdir / f'{label}.db'}"
    import psycopg

    name = f"mcpbill_bench_{label}" if keep else f"mcpbill_bench_{label}_{os.getpid()}"
    with psycopg.connect(_libpq(PG_ADMIN), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    return make_url(PG_ADMIN).set(drivername="postgresql+psycopg", database=name
                                  ).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        Path(str(parsed.database)).unlink(missing_ok=True)
        return
    import psycopg

    with psycopg.connect(_libpq(PG_ADMIN), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def best_of_three(engine: Engine, query: Any, start: datetime,
                  read: Callable[[Any], Any] = methodcaller("all")) -> tuple[float, Any]:
    """The least seconds of three runs of ``query`` over the day from ``start`` (``:start`` to
    ``:end``), each on a new connection and ``read`` whole; and what the last ``read`` gave."""
    bounds: dict[str, Any] = {"start": start, "end": start + timedelta(days=1)}
    if engine.dialect.name == "sqlite":
        bounds = {k: _sqlite_value(v) for k, v in bounds.items()}
    best, got = float("inf"), None
    for _ in range(3):
        started = time.perf_counter()
        with engine.connect() as conn:
            got = read(conn.execute(query, bounds))
        best = min(best, time.perf_counter() - started)
    return best, got


def bare_seconds(engine: Engine, start: datetime) -> float:
    """Best of three: the baseline GROUP BY over the day's calls."""
    return best_of_three(engine, text(
        "SELECT tool, count(*), sum(amount) FROM calls "
        "WHERE created_at >= :start AND created_at < :end GROUP BY tool"), start)[0]


_HASHED = ("id", "at", "kind", "code", "jti", "token_hash", "tenant", "agent", "tool",
           "amount", "ref", "detail", "demo")


def chain_floor_seconds(engine: Engine, start: datetime) -> float:
    """Best of three: one SHA-256 per event of the day over its hashed fields joined as text
    by the database (no canonical form, no escaping, no comparison), and nothing else. Any
    exact re-hash of the sealed events does at least this much. PostgreSQL hashes in SQL (parallel
    workers allowed, as for the bare query); SQLite has no SHA-256, so the joined text is read
    into Python and hashed there, in one process."""
    if engine.dialect.name == "postgresql":
        joined = f"concat_ws('|', {', '.join(_HASHED)})"
        query = text(f"SELECT count(sha256(convert_to({joined}, 'UTF8'))) FROM events "
                     "WHERE at >= :start AND at < :end")
    else:
        joined = " || '|' || ".join(f"ifnull({name}, '')" for name in _HASHED)
        query = text(f"SELECT {joined} FROM events WHERE at >= :start AND at < :end")

    def hashed(rows: Any) -> None:
        for (value,) in rows:
            if isinstance(value, str):
                hashlib.sha256(value.encode()).digest()

    return best_of_three(engine, query, start, hashed)[0]


def match_floor_seconds(engine: Engine, start: datetime) -> float:
    """Best of three: the day's money-moving events matched one to one to their transfers, as
    one GROUP BY over the transfer each event names and the transfers' ids (the mismatches
    counted, none on a clean day), on the raw connection; PostgreSQL may use parallel workers,
    as for the bare query."""
    kinds = ", ".join(f"'{kind}'" for kind in event_transfers.KINDS)
    query = text(
        "SELECT count(*) FROM (SELECT transfer FROM ("  # noqa: S608 - constants only
        f"SELECT kind || ':' || coalesce(ref, '') AS transfer, 1 AS written, 0 AS moved "
        f"FROM events WHERE at >= :start AND at < :end AND kind IN ({kinds}) "
        f"UNION ALL SELECT id, 0, 1 FROM transfers "
        f"WHERE created_at >= :start AND created_at < :end AND code IN ({kinds})) AS both_sides "
        "GROUP BY transfer HAVING sum(written) != 1 OR sum(moved) != 1) AS mismatched")
    best, mismatched = best_of_three(engine, query, start, methodcaller("scalar_one"))
    if mismatched:
        raise SystemExit(f"the generated day has {mismatched} events and transfers unmatched")
    return best


# --- reconciling in a subprocess ------------------------------------------------------------

# What each measured run checks. "window": the day's own checks only (--window-only --chain
# off); "sql": plus the ledger-wide invariants (--chain off); "default": `mcpbill reconcile
# --date` as it runs (the seals of the day's events, and their events re-hashed); "receipts":
# with --verify-receipts.
MODES: dict[str, dict[str, Any]] = {
    "window": {"chain": "off", "ledger_wide": False},
    "sql": {"chain": "off"},
    "default": {},
    "receipts": {"verify_receipts": True},
}


def child(db_url: str, keys_dir: str, mode: str, jobs: int, *, day: date = DAY,
          profile: bool = False) -> None:
    """Run one reconcile of ``day``; print {seconds, maxrss_kib, findings, calls, ledger
    (where its ledger check started), snapshot_at, phases} as JSON."""
    from mcpbill_cli.reconcile import ReconcileOptions, Window, reconcile

    phases = _time_phases() if profile else {}
    engine = make_engine(db_url)
    window = Window.day(day)
    options = ReconcileOptions(window=window, keys_dir=Path(keys_dir), jobs=jobs,
                               now=window.end + timedelta(days=1), **MODES[mode])
    started = time.perf_counter()
    report = reconcile(engine, options)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "maxrss_kib": peak_rss_kib(),
                      "workers_maxrss_kib": resource.getrusage(
                          resource.RUSAGE_CHILDREN).ru_maxrss,
                      "findings": [(f.name, f.count) for f in report.findings],
                      "calls": report.summary.calls, "phases": phases,
                      "ledger": next((c for c in report.checks if c.startswith("ledger_")),
                                     None),
                      "snapshot_at": str(report.snapshot_at)}))


# The phases --profile times besides each check of the list (by name, its find and its note,
# on this thread: a check started beside the others shows the time waited for it): (module,
# function) where its callers look it up; a function's time includes what it calls.
PHASES = [
    ("mcpbill_cli.reconcile.tuning", "begin"),
    ("mcpbill_cli.reconcile.totals", "TotalsBuilder.add_refusals"),
    ("mcpbill_cli.reconcile.ledger_checks", "check_control_totals"),
    ("mcpbill_cli.ledger.invariants", "_balances_sum_to_zero"),
    ("mcpbill_cli.ledger.invariants", "_no_overdraft"),
    ("mcpbill_cli.ledger.invariants", "_sums_and_spending"),
    ("mcpbill_cli.ledger.invariants", "_captured_calls_posted"),
    ("mcpbill_cli.ledger.invariants", "_captured_calls_posted_since"),
    ("mcpbill_cli.reconcile.snapshots", "write"),
    ("mcpbill_cli.reconcile.seal_check", "seal_scope"),
    ("mcpbill_cli.reconcile.seal_check", "_check_seals"),
    ("mcpbill_cli.reconcile.seal_check", "_check_batches"),
    ("mcpbill_cli.reconcile.seal_check", "check_unsealed"),
]


def _time_phases() -> dict[str, float]:
    """Wrap each function of :data:`PHASES` where its callers look it up; sum its time."""
    import functools
    import importlib

    spent: dict[str, float] = {}

    def timed(name: str, function: Any) -> Any:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - started
        return wrapper

    import dataclasses

    from mcpbill_cli.reconcile import run

    runner: Any = run  # its CHECKS, replaced by timed ones
    runner.CHECKS = tuple(dataclasses.replace(
        check, find=timed(f"check {check.name}", check.find),
        note=timed(f"check {check.name}", check.note)) for check in runner.CHECKS)
    for module_name, path in PHASES:
        owner: Any = importlib.import_module(module_name)
        *parents, attribute = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        if hasattr(owner, attribute):  # a phase renamed or gone is not timed
            setattr(owner, attribute, timed(path, getattr(owner, attribute)))
    return spent


def peak_rss_kib() -> int:
    """This process's peak RSS: VmHWM (ru_maxrss would carry the spawning parent's peak
    across exec on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_child(db_url: str, mode: str, jobs: int, profile: bool, *, day: date = DAY,
              keep_snapshot: bool = False) -> dict[str, Any]:
    """One reconcile of ``day`` in a fresh process. The snapshot a run before left at the
    day's end (or later) is deleted first, so that every run does the same work, writing it
    included (``keep_snapshot``: left for the next day to start from)."""
    if not keep_snapshot:
        _drop_snapshots(db_url, after=day)
    done = subprocess.run(
        [sys.executable, __file__, "--child", db_url, str(KEYS_DIR), mode, str(jobs),
         day.isoformat()] + (["--profile"] if profile else []),
        check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["findings"]:
        raise SystemExit(f"the generated ledger is not clean ({mode}): {result['findings']}")
    return result


def _drop_snapshots(db_url: str, *, after: date) -> None:
    engine = make_engine(db_url)
    moment = datetime(after.year, after.month, after.day, tzinfo=UTC)
    try:
        with engine.begin() as conn:
            for table in (account_snapshots, ledger_snapshots):
                conn.execute(delete(table).where(table.c.at > moment))
    finally:
        engine.dispose()


@dataclass(frozen=True)
class Plan:
    workdir: Path
    keep: bool
    jobs: int
    modes: list[str]
    profile: bool
    history_days: int = 10


def bench(backend: str, rows: int, plan: Plan) -> None:
    label = f"r{rows}"
    done_marker = plan.workdir / f"{backend}-{label}.done"
    reuse = plan.keep and done_marker.exists()
    url = (done_marker.read_text().strip() if reuse
           else fresh_database(backend, plan.workdir, label, keep=plan.keep))
    engine = make_engine(url)
    try:
        built = -1.0
        if not reuse:
            upgrade(engine)
            started = time.perf_counter()
            generate(engine, rows, KEYS_DIR, jobs=plan.jobs)
            built = time.perf_counter() - started
            _analyze(engine)
            if plan.keep:
                done_marker.write_text(url)
        day = datetime(DAY.year, DAY.month, DAY.day, tzinfo=UTC)
        bare = bare_seconds(engine, day)
        floor = chain_floor_seconds(engine, day)
        match = match_floor_seconds(engine, day)
        results = {mode: run_child(url, mode, plan.jobs, plan.profile) for mode in plan.modes}
        _print_results(backend, rows, built, bare, results)
        where = "in SQL" if backend == "postgres" else "in Python, one process"
        print(f"  floor: one SHA-256 per event ({where}) {floor:6.2f} s = {floor / bare:4.1f}x "
              "bare: re-hashing the sealed events costs at least this", flush=True)
        print(f"  match: each event to its transfer, one GROUP BY {match:6.2f} s = "
              f"{match / bare:4.1f}x bare", flush=True)
        if "default" in results:
            seconds = results["default"]["seconds"]
            print(f"  default / floor = {seconds / floor:4.1f}x (goal <= 2x); "
                  f"default / (floor + match) = {seconds / (floor + match):4.1f}x", flush=True)
        if plan.history_days:
            bench_history(backend, rows, plan, url)
    finally:
        engine.dispose()
        if not plan.keep:
            drop_database(url)


def bench_history(backend: str, rows: int, plan: Plan, alone_url: str) -> None:
    """The same day (DAY) reconciled after ``plan.history_days`` earlier days (each of
    ``rows`` calls, reconciled in order first, so each leaves its snapshot) against the day
    alone (the ledger ``bench`` timed: no history), both as ``mcpbill reconcile --date`` runs;
    best of three each, interleaved. Incremental: the ratio stays near 1 (target <= 1.2)."""
    days = [DAY - timedelta(days=n) for n in range(plan.history_days, -1, -1)]
    label = f"h{plan.history_days}r{rows}"
    done_marker = plan.workdir / f"{backend}-{label}.done"
    reuse = plan.keep and done_marker.exists()
    url = (done_marker.read_text().strip() if reuse
           else fresh_database(backend, plan.workdir, label, keep=plan.keep))
    try:
        built = -1.0 if reuse else _build(url, rows, plan, days)
        if plan.keep:
            done_marker.write_text(url)
        _drop_snapshots(url, after=days[0] - timedelta(days=1))
        earlier = [run_child(url, "default", plan.jobs, False, day=day, keep_snapshot=True)
                   for day in days[:-1]]
        after, alone = [], []
        for _ in range(3):
            after.append(run_child(url, "default", plan.jobs, False))
            alone.append(run_child(alone_url, "default", plan.jobs, False))
        _print_history(backend, rows, built, days, earlier, after, alone)
    finally:
        if not plan.keep:
            drop_database(url)


def _build(url: str, rows: int, plan: Plan, days: list[date]) -> float:
    engine = make_engine(url)
    try:
        upgrade(engine)
        started = time.perf_counter()
        generate(engine, rows, KEYS_DIR, jobs=plan.jobs, days=days)
        built = time.perf_counter() - started
        _analyze(engine)
        return built
    finally:
        engine.dispose()


def _print_history(backend: str, rows: int, built: float, days: list[date],
                   earlier: list[dict[str, Any]], after: list[dict[str, Any]],
                   alone: list[dict[str, Any]]) -> None:
    how = "reused" if built < 0 else f"built in {built:.0f} s"
    first, rest = earlier[0]["seconds"], [r["seconds"] for r in earlier[1:]]
    print(f"{backend} {len(days)} days of {rows:,} calls ({how}): days 1-{len(days) - 1} "
          f"reconciled in order: day 1 {first:.2f} s ({earlier[0]['ledger']}), days 2-"
          f"{len(days) - 1} {min(rest, default=0):.2f}-{max(rest, default=0):.2f} s", flush=True)
    best_after = min(r["seconds"] for r in after)
    best_alone = min(r["seconds"] for r in alone)
    print(f"  day {len(days)} after {len(days) - 1} days {best_after:8.2f} s   "
          f"{after[0]['ledger']}", flush=True)
    print(f"  day {len(days)} alone        {best_alone:8.2f} s   {alone[0]['ledger']}",
          flush=True)
    print(f"  history: after / alone = {best_after / best_alone:4.2f}x (target <= 1.2)",
          flush=True)


def _analyze(engine: Engine) -> None:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
        else:
            conn.exec_driver_sql("ANALYZE")


def _print_results(backend: str, rows: int, built: float, bare: float,
                   results: dict[str, dict[str, Any]]) -> None:
    how = "reused" if built < 0 else f"built in {built:.0f} s"
    print(f"{backend} {rows:,} calls ({how}): bare GROUP BY {bare:.3f} s", flush=True)
    for mode, result in results.items():
        seconds = result["seconds"]
        workers = result["workers_maxrss_kib"]
        print(f"  {mode:9} {seconds:8.2f} s = {seconds / bare:6.1f}x bare   "
              f"peak RSS {result['maxrss_kib'] / 1024:5.0f} MiB"
              + (f" (workers {workers / 1024:.0f} MiB)" if workers else ""), flush=True)
        for phase, spent in result.get("phases", {}).items():
            print(f"      {phase:34} {spent:7.2f} s = {spent / bare:5.1f}x", flush=True)
    if "receipts" in results and "default" in results:
        extra = results["receipts"]["seconds"] - results["default"]["seconds"]
        print(f"  receipt signatures: {results['receipts']['calls'] / max(extra, 1e-9):,.0f} "
              "calls/s", flush=True)


def main(argv: list[str] | None = None) -> None:
    global KEYS_DIR
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-receipts", action="store_true",
                        help="skip the --verify-receipts run (the slowest)")
    parser.add_argument("--modes", help="comma-separated modes to run (default: all)")
    parser.add_argument("--data", type=Path,
                        help="keep the generated ledgers here and reuse them next time")
    parser.add_argument("--only-rows", action="store_true",
                        help="run --rows only, not also 100k")
    parser.add_argument("--profile", action="store_true", help="time each reconcile phase")
    parser.add_argument("--history-days", type=int, default=10,
                        help="also time the day after this many earlier days against the day "
                             "alone (0: do not)")
    args = parser.parse_args(argv)
    sizes = [args.rows] if args.only_rows else sorted({min(100_000, args.rows), args.rows})
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    modes = args.modes.split(",") if args.modes else list(MODES)
    modes = [m for m in modes if not (args.no_receipts and m == "receipts")]
    with tempfile.TemporaryDirectory(prefix="mcpbill-bench-") as tmp:
        workdir = args.data or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        KEYS_DIR = workdir / "keys"
        if not (KEYS_DIR / "keyring.json").exists():
            init_keyring(KEYS_DIR, "EdDSA", now=datetime.now(UTC), force=False).save()
        plan = Plan(workdir, args.data is not None, args.jobs, modes, args.profile,
                    args.history_days)
        print(f"reconcile one day; {args.jobs} job(s); goal: default <= 2x its floor, flat "
              "peak RSS",
              flush=True)
        for backend in backends:
            for rows in sizes:
                bench(backend, rows, plan)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]),
              day=date.fromisoformat(sys.argv[6]), profile="--profile" in sys.argv[7:])
    else:
        main()
