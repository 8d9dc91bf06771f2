"""Schema 0005 on a ledger that 0004 code wrote: the old hash chain is verified, then dropped;
every token gets its own revenue account; ``mcpbill db upgrade`` seals the old events with the
home's key. A 0004 ledger whose chain does not verify is not migrated at all.

0004 code cannot run against this tree, so its writes are made here row by row: accounts,
transfers, tokens and calls as its ledger held them, and events chained as its
``audit.record`` chained them (``seq``, ``prev_hash``, ``hash = event_hash(prev, event)``,
the ``audit_head`` row moved along), as migration 0002 shows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    DateTime,
    Engine,
    column,
    delete,
    func,
    insert,
    inspect,
    select,
    table,
    update,
)
from typer.testing import CliRunner, Result

from mcpbill_cli.cli import app
from mcpbill_cli.clock import aware, utcnow
from mcpbill_cli.errors import AuditChainBroken
from mcpbill_cli.keys import KeyRing, KeySource, init_keyring, keys_from_jwks
from mcpbill_cli.ledger import calls, invariants, ops
from mcpbill_cli.ledger.audit import CHAIN_FIELDS, GENESIS, event_digest, event_hash
from mcpbill_cli.ledger.engine import current_revision, make_engine, reading, writing
from mcpbill_cli.ledger.models import (
    SCHEMA_REVISION,
    accounts,
    events,
    refusal_counts,
    seals,
    transfers,
)
from mcpbill_cli.ledger.models import calls as calls_table
from mcpbill_cli.ledger.models import tokens as tokens_table
from mcpbill_cli.ledger.schema import upgrade
from mcpbill_cli.ledger.seals import read_seals
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.tokens import Claims, encode_token
from mcpbill_cli.verifier import Verifier
from tests.ledger.test_seals import assert_sealed_exactly_once
from tests.verifier.billing_support import PRICE, PRICING_DOC, USDC

# events and audit_head as schema 0004 had them
EVENTS_0004 = table(
    "events", column("id", BigInteger), column("at", DateTime(timezone=True)), column("kind"),
    column("code"), column("jti"), column("token_hash"), column("tenant"), column("agent"),
    column("tool"), column("amount", BigInteger), column("ref"), column("detail"),
    column("demo", Boolean), column("seq", BigInteger), column("prev_hash"), column("hash"))
AUDIT_HEAD = table("audit_head", column("id"), column("seq", BigInteger), column("hash"))

HELD = 20_000


@dataclass
class OldLedger:
    """A ledger at schema 0004 with a day's activity, and what wrote it."""

    url: str
    engine: Engine
    ring: KeyRing
    tokens: dict[str, str]  # jti -> the JWT
    held_call: str
    events: list[dict[str, Any]]  # as written, in seq order


class Writer0004:
    """Rows as mcpbill 0004 wrote them, one transaction at a time."""

    def __init__(self, conn: Connection, now: datetime) -> None:
        self.conn = conn
        self.now = now
        self.seq = 0
        self.head = GENESIS
        self.written: list[dict[str, Any]] = []

    def event(self, kind: str, **fields: Any) -> None:
        """``audit.record`` of 0004: the next seq, chained to the head, the head moved."""
        self.seq += 1
        at = self.now + timedelta(seconds=self.seq, microseconds=self.seq * 1111)
        row = {name: fields.get(name) for name in CHAIN_FIELDS}
        row.update(seq=self.seq, at=at, kind=kind, demo=fields.get("demo", False))
        if isinstance(row["detail"], dict):
            row["detail"] = json.dumps(row["detail"], sort_keys=True)
        digest = event_hash(self.head, row)
        self.conn.execute(insert(EVENTS_0004).values(**row, prev_hash=self.head, hash=digest))
        self.conn.execute(update(AUDIT_HEAD).where(AUDIT_HEAD.c.id == 1)
                          .values(seq=self.seq, hash=digest))
        self.head = digest
        self.written.append(row)

    def account(self, id: str, kind: str, *, guarded: bool, **sums: int) -> None:
        self.conn.execute(insert(accounts).values(
            id=id, kind=kind, guarded=guarded, closed=False, created_at=self.now,
            **{name: sums.get(name, 0) for name in (
                "debits_posted", "credits_posted", "debits_pending", "credits_pending")}))

    def transfer(self, id: str, debit: str, credit: str, amount: int, code: str, *,
                 kind: str = "posted", status: str | None = None,
                 timeout_at: datetime | None = None, ref: str | None = None) -> None:
        self.conn.execute(insert(transfers).values(
            id=id, debit_account_id=debit, credit_account_id=credit, amount=amount, kind=kind,
            pending_id=None, status=status, timeout_at=timeout_at, code=code, ref=ref,
            demo=True, created_at=self.now))

    def token(self, ring: KeyRing, jti: str, limit: int) -> str:
        info, key = ring.signing_key()
        claims = Claims(jti=jti, tenant="acme", agent=f"agent-{jti}", scope=("*",),
                        audience="mcpbill", issuer="mcpbill", issued_at=self.now,
                        not_before=self.now, expires_at=self.now + timedelta(hours=2),
                        limit=limit, kid=info.kid)
        self.conn.execute(insert(tokens_table).values(
            jti=jti, tenant="acme", agent=claims.agent, kid=info.kid, scope='["*"]',
            audience="mcpbill", parent_jti=None, limit_micro=limit, issued_at=self.now,
            expires_at=claims.expires_at, demo=True))
        return encode_token(claims, info.alg, key)

    def call(self, call_id: str, jti: str, *, status: str, amount: int | None,
             held: int, receipt: str | None, timeout_at: datetime | None) -> None:
        self.conn.execute(insert(calls_table).values(
            id=call_id, idempotency_key=f"key-{call_id}", request_hash="0" * 64, jti=jti,
            tenant="acme", agent=f"agent-{jti}", tool="search", units=None, amount_held=held,
            amount=amount, status=status,
            transfer_id=f"charge:{call_id}" if status == "captured" else None,
            timeout_at=timeout_at, pricing_version=1, price_rule="tools.search",
            receipt=receipt, result=None, demo=True, created_at=self.now,
            resolved_at=self.now if status == "captured" else None, key_retired=False))


def write_a_day(conn: Connection, ring: KeyRing, now: datetime) -> tuple[Writer0004,
                                                                          dict[str, str]]:
    """A demo deposit, two tokens, a charge of one, a hold of the other, a refusal."""
    w = Writer0004(conn, now)
    w.account("chain:demo", "chain", guarded=False, debits_posted=5 * USDC)
    w.account("tenant:acme", "tenant", guarded=True, credits_posted=5 * USDC,
              debits_posted=3 * USDC)
    conn.execute(update(accounts).where(accounts.c.id == ops.REVENUE)  # 0001 made it
                 .values(credits_posted=PRICE, credits_pending=HELD))
    w.account("token:tok_a", "token", guarded=True, credits_posted=2 * USDC,
              debits_posted=PRICE)
    w.account("token:tok_b", "token", guarded=True, credits_posted=USDC, debits_pending=HELD)
    w.transfer("deposit:demo:1", "chain:demo", "tenant:acme", 5 * USDC, "deposit", ref="demo")
    w.event("deposit", tenant="acme", amount=5 * USDC, ref="deposit:demo:1", demo=True)
    jwts = {jti: w.token(ring, jti, limit) for jti, limit in (("tok_a", 2 * USDC),
                                                              ("tok_b", USDC))}
    for jti, limit in (("tok_a", 2 * USDC), ("tok_b", USDC)):
        w.transfer(f"allot:{jti}", "tenant:acme", f"token:{jti}", limit, "allot", ref=jti)
        w.event("issue", jti=jti, tenant="acme", agent=f"agent-{jti}", amount=limit,
                demo=True, detail={"scope": ["*"]})
    w.transfer("charge:rcpt_a", "token:tok_a", ops.REVENUE, PRICE, "charge", ref="rcpt_a")
    w.call("rcpt_a", "tok_a", status="captured", amount=PRICE, held=PRICE,
           receipt="a-receipt-jws", timeout_at=None)
    w.event("charge", jti="tok_a", tenant="acme", agent="agent-tok_a", tool="search",
            amount=PRICE, ref="rcpt_a", demo=True)
    timeout = now + timedelta(hours=1)
    w.transfer("hold:rcpt_b", "token:tok_b", ops.REVENUE, HELD, "hold", kind="pending",
               status="pending", timeout_at=timeout, ref="rcpt_b")
    w.call("rcpt_b", "tok_b", status="held", amount=None, held=HELD, receipt=None,
           timeout_at=timeout)
    w.event("hold", jti="tok_b", tenant="acme", agent="agent-tok_b", tool="summarize",
            amount=HELD, ref="rcpt_b", demo=True)
    w.event("refusal", code="INVALID_CREDIT_TOKEN", token_hash="ab" * 32, tool="search",
            detail={"reason": "malformed"}, demo=True)
    return w, jwts


@pytest.fixture
def old_ledger(db_url: str, isolated_home: Path) -> Iterator[OldLedger]:
    keys_dir = isolated_home / "keys"
    init_keyring(keys_dir, "EdDSA", now=utcnow(), force=False).save()
    ring = KeyRing.load(keys_dir)
    engine = make_engine(db_url)
    assert upgrade(engine, "0004") == (None, "0004")
    with writing(engine) as conn:
        w, jwts = write_a_day(conn, ring, utcnow().replace(microsecond=0))
    yield OldLedger(db_url, engine, ring, jwts, "rcpt_b", w.written)
    engine.dispose()


def columns(engine: Engine, name: str) -> list[str]:
    return [c["name"] for c in inspect(engine).get_columns(name)]


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def sums(conn: Connection, account: str) -> tuple[int, int, int, int]:
    row = conn.execute(select(accounts.c.debits_posted, accounts.c.credits_posted,
                              accounts.c.debits_pending, accounts.c.credits_pending)
                       .where(accounts.c.id == account)).one()
    return tuple(int(v) for v in row)  # type: ignore[return-value]


def event_contents(engine: Engine) -> list[tuple[Any, ...]]:
    fields = [f for f in CHAIN_FIELDS if f != "seq"]
    with reading(engine) as conn:
        rows = conn.execute(select(*(events.c[f] for f in fields)).order_by(events.c.id))
        return [(aware(row[0]), *row[1:]) for row in rows]


# --- the upgrade ----------------------------------------------------------------------------------


def test_upgrade_drops_the_chain_and_keeps_every_event(old_ledger: OldLedger) -> None:
    engine = old_ledger.engine
    assert "seq" in columns(engine, "events") and "audit_head" in table_names(engine)
    written = [(row["at"], *(row[f] for f in CHAIN_FIELDS[2:])) for row in old_ledger.events]

    assert upgrade(engine, "0005") == ("0004", "0005")

    assert current_revision(engine) == "0005"
    assert {"seq", "prev_hash"}.isdisjoint(columns(engine, "events"))
    assert {"seal", "hash"} <= set(columns(engine, "events"))
    assert "ix_events_seal" in {i["name"] for i in inspect(engine).get_indexes("events")}
    assert "audit_head" not in table_names(engine)
    assert {"seals", "refusal_counts"} <= table_names(engine)
    assert event_contents(engine) == written  # the same events, in the same order
    with reading(engine) as conn:
        assert conn.execute(select(events.c.seal, events.c.hash).distinct()).all() == [
            (None, None)]  # unsealed, for the first sealer
        assert conn.execute(select(func.count()).select_from(seals)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(refusal_counts)).scalar_one() == 0


def test_upgrade_opens_an_empty_revenue_account_per_token(old_ledger: OldLedger) -> None:
    upgrade(old_ledger.engine)
    with reading(old_ledger.engine) as conn:
        issued = dict(conn.execute(select(tokens_table.c.jti, tokens_table.c.issued_at)).all())
        rows = conn.execute(select(accounts).where(accounts.c.kind == "revenue")
                            .order_by(accounts.c.id)).mappings().all()
        assert [(r["id"], r["guarded"], r["closed"]) for r in rows] == [
            (ops.REVENUE, False, False), ("revenue:tok_a", False, False),
            ("revenue:tok_b", False, False)]
        for row in rows[1:]:
            assert sums(conn, row["id"]) == (0, 0, 0, 0)
            assert aware(row["created_at"]) == aware(issued[row["id"].removeprefix("revenue:")])
        assert sums(conn, ops.REVENUE) == (0, PRICE, 0, HELD)  # what it earned, and its hold
        assert invariants.check(conn) == []


def test_a_migrated_ledger_bills_old_tokens_to_their_own_revenue_and_settles_old_holds(
        old_ledger: OldLedger) -> None:
    upgrade(old_ledger.engine)
    verifier = Verifier(keys=KeySource(directory=old_ledger.ring.directory),
                        pricing=PricingTable.from_document(PRICING_DOC),
                        engine=old_ledger.engine)
    receipt = verifier.charge(old_ledger.tokens["tok_a"], "search", idempotency_key="after")
    assert receipt.amount == PRICE and receipt.remaining == 2 * USDC - 2 * PRICE
    now = utcnow()
    with writing(old_ledger.engine) as conn:  # the hold 0004 left, captured now
        settled = calls.settle(conn, old_ledger.held_call, amount=None, at=now)
        assert isinstance(settled, calls.Settled) and settled.posted == HELD
        calls.record_capture(conn, old_ledger.held_call, settled, units=None, at=now,
                             receipt="b-receipt-jws", result=None)
    with reading(old_ledger.engine) as conn:
        assert sums(conn, "revenue:tok_a") == (0, PRICE, 0, 0)
        assert sums(conn, "revenue:tok_b") == (0, 0, 0, 0)
        assert sums(conn, ops.REVENUE) == (0, PRICE + HELD, 0, 0)
        assert invariants.check(conn) == []


def test_an_empty_0004_ledger_upgrades(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0004")
        assert upgrade(engine, "0005") == ("0004", "0005")
    finally:
        engine.dispose()


# --- `mcpbill db upgrade` seals what the chain held -----------------------------------------------


def mcpbill(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_db_upgrade_seals_the_old_events_with_the_homes_key(
        old_ledger: OldLedger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCPBILL_DB_URL", old_ledger.url)
    result = mcpbill("db", "upgrade", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["data"]
    assert (data["from"], data["to"], data["changed"], data["sealed_events"]) == (
        "0004", SCHEMA_REVISION, True, len(old_ledger.events))

    jwks = mcpbill("keys", "export-jwks")
    assert jwks.exit_code == 0, jwks.output
    made = assert_sealed_exactly_once(old_ledger.engine, keys_from_jwks(json.loads(jwks.stdout)))
    assert [(m.number, m.count) for m in made] == [(1, len(old_ledger.events))]
    with reading(old_ledger.engine) as conn:
        hashes = [row.hash for row in conn.execute(select(events.c.hash).order_by(events.c.id))]
        [seal] = read_seals(conn)
    assert hashes == [event_digest({**row, "id": n}) for n, row in
                      enumerate(old_ledger.events, start=1)]
    assert seal.first_id == 1 and seal.last_id == len(old_ledger.events)

    again = json.loads(mcpbill("db", "upgrade", "--json").stdout)["data"]
    assert (again["changed"], again["sealed_events"]) == (False, 0)


def test_db_upgrade_without_keys_migrates_and_leaves_sealing_for_later(
        old_ledger: OldLedger, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MCPBILL_HOME", str(tmp_path / "keyless"))
    monkeypatch.setenv("MCPBILL_DB_URL", old_ledger.url)
    result = mcpbill("db", "upgrade", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["data"]
    assert (data["to"], data["sealed_events"]) == (SCHEMA_REVISION, None)
    with reading(old_ledger.engine) as conn:
        assert conn.execute(select(func.count()).where(events.c.seal.is_(None))
                            ).scalar_one() == len(old_ledger.events)


# --- a broken chain is not migrated ---------------------------------------------------------------


def edit_an_event(conn: Connection) -> None:
    conn.execute(update(EVENTS_0004).where(EVENTS_0004.c.seq == 4).values(amount=1))


def delete_a_middle_event(conn: Connection) -> None:
    conn.execute(delete(EVENTS_0004).where(EVENTS_0004.c.seq == 3))


def delete_the_last_event(conn: Connection) -> None:
    conn.execute(delete(EVENTS_0004).where(EVENTS_0004.c.seq == 6))


def move_the_head(conn: Connection) -> None:
    conn.execute(update(AUDIT_HEAD).values(seq=5))


def rehash_an_edited_event(conn: Connection) -> None:
    """The edited event's own hash recomputed: the next event's prev_hash no longer matches."""
    row = conn.execute(select(EVENTS_0004).where(EVENTS_0004.c.seq == 2)).mappings().one()
    edited = {**row, "amount": 1}
    conn.execute(update(EVENTS_0004).where(EVENTS_0004.c.seq == 2).values(
        amount=1, hash=event_hash(row["prev_hash"], edited)))


@pytest.mark.parametrize("tamper, message", [
    (edit_an_event, "the audit chain breaks at event 4"),
    (rehash_an_edited_event, "the audit chain breaks at event 3"),
    (delete_a_middle_event, "the audit chain breaks at event 3"),
    (delete_the_last_event, "the audit chain's end does not match audit_head"),
    (move_the_head, "the audit chain's end does not match audit_head"),
], ids=lambda v: getattr(v, "__name__", ""))
def test_a_0004_ledger_whose_chain_is_broken_is_not_migrated(
        old_ledger: OldLedger, tamper: Any, message: str) -> None:
    engine = old_ledger.engine
    with writing(engine) as conn:
        tamper(conn)
    before = event_rows_0004(engine)

    with pytest.raises(AuditChainBroken, match=message) as refused:
        upgrade(engine)

    assert refused.value.code == "AUDIT_CHAIN_BROKEN"
    assert "mcpbill reconcile" in refused.value.message
    assert current_revision(engine) == "0004"
    assert "seq" in columns(engine, "events") and "audit_head" in table_names(engine)
    assert {"seals", "refusal_counts"}.isdisjoint(table_names(engine))
    assert event_rows_0004(engine) == before  # nothing half done
    with reading(engine) as conn:
        assert conn.execute(select(func.count()).where(accounts.c.kind == "revenue")
                            ).scalar_one() == 1


def event_rows_0004(engine: Engine) -> list[tuple[Any, ...]]:
    with reading(engine) as conn:
        return [tuple(row) for row in conn.execute(
            select(EVENTS_0004.c.seq, EVENTS_0004.c.amount, EVENTS_0004.c.prev_hash,
                   EVENTS_0004.c.hash).order_by(EVENTS_0004.c.seq))]


def test_db_upgrade_of_a_broken_chain_says_what_to_do_as_one_json_document(
        old_ledger: OldLedger, monkeypatch: pytest.MonkeyPatch) -> None:
    with writing(old_ledger.engine) as conn:
        edit_an_event(conn)
    monkeypatch.setenv("MCPBILL_DB_URL", old_ledger.url)
    result = CliRunner().invoke(app, ["db", "upgrade", "--json"])
    assert result.exit_code != 0
    document = json.loads(result.stdout)
    assert document["status"] == "error" and document["data"] is None, document
    assert "mcpbill reconcile" in document["errors"][0]["message"]
    assert current_revision(old_ledger.engine) == "0004"


