"""Sealing the audit trail (DESIGN.md, "Sealing"): committed events chained in signed batches.

A third party holding the operator's JWKS checks every seal; each kind of tampering someone
with write access to the database but without the signing key could try is found; sealers
racing in threads and in processes never fork the chain; and a paid call locks no row that
calls of other tokens lock too (the old ``audit_head`` and shared ``revenue`` rows did).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from sqlalchemy import Connection, Engine, delete, func, insert, select, text, update
from sqlalchemy.engine import make_url

from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import LedgerUnavailable, ScopeDenied
from mcpbill_cli.keys import KeyRing, KeySource, VerificationKey, init_keyring, keys_from_jwks
from mcpbill_cli.ledger import audit, calls, ops
from mcpbill_cli.ledger import seals as seals_module
from mcpbill_cli.ledger.audit import EVENT_FIELDS, GENESIS, event_digest
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.ledger.engine import make_engine, reading, writing
from mcpbill_cli.ledger.models import accounts, events, seals
from mcpbill_cli.ledger.sealing import seal_all
from mcpbill_cli.ledger.seals import (
    BATCH_LIMIT,
    SEAL_TYPE,
    Seal,
    Sign,
    batch_hash,
    read_seals,
    seal_pending,
    signer,
    stray_seal_numbers,
    unsealed_before,
    verify_batch,
    verify_seal,
)
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.sealer import Sealer
from mcpbill_cli.verifier import Verifier
from tests.verifier.billing_support import PRICE, PRICING_DOC, USDC, fund, mint, run_threads

AT = datetime(2026, 12, 5, 12, 0, 0, 123456, tzinfo=UTC)
e = events.c
s = seals.c


# --- keys: the operator's, and what a third party holds ----------------------------------------


def new_ring(directory: Path) -> KeyRing:
    init_keyring(directory, "EdDSA", now=utcnow(), force=False).save()
    return KeyRing.load(directory)


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return new_ring(tmp_path / "keys")


@pytest.fixture
def sign(ring: KeyRing) -> Sign:
    info, key = ring.signing_key()
    return signer(info.alg, info.kid, key)


@pytest.fixture
def jwks_keys(ring: KeyRing) -> dict[str, VerificationKey]:
    """The operator's public keys as a third party gets them: the JWKS document, as JSON."""
    return keys_from_jwks(json.loads(json.dumps(ring.jwks())))


# --- writing and sealing -----------------------------------------------------------------------


def write_events(engine: Engine, count: int, *, at: datetime = AT, start: int = 0) -> list[int]:
    """``count`` events, each committed in a transaction of its own; their ids."""
    for n in range(start, start + count):
        with writing(engine) as conn:
            audit.record(conn, "charge", at=at + timedelta(seconds=n, microseconds=n),
                         jti=f"tok_{n}", tenant="acme", agent="agent-1", tool="search",
                         amount=1000 + n, ref=f"rcpt_{n}", detail={"n": n}, demo=n % 2 == 0)
    with reading(engine) as conn:
        ids = conn.execute(select(e.id).order_by(e.id)).scalars().all()
    return [int(i) for i in ids[len(ids) - count:]]


def seal_batches(engine: Engine, sign: Sign, *, limit: int, now: datetime = AT) -> list[Seal]:
    made: list[Seal] = []
    while True:
        with writing(engine) as conn:
            seal = seal_pending(conn, sign, now=now, limit=limit)
        if seal is None:
            return made
        made.append(seal)


def event_rows(engine: Engine) -> list[dict[str, Any]]:
    with reading(engine) as conn:
        rows = conn.execute(select(e.id, e.seal, e.hash, *(e[f] for f in EVENT_FIELDS))
                            .order_by(e.id)).mappings().all()
    return [dict(row) for row in rows]


def documented_seal_hash(claims: dict[str, Any]) -> str:
    """A seal's hash as seals.py documents it, computed without its code: sha256 of the
    canonical JSON (sorted keys, compact) of the signed claims other than ``hash``."""
    fields = {k: v for k, v in claims.items() if k != "hash"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def findings(engine: Engine, keys: dict[str, VerificationKey] | None
             ) -> list[tuple[str, str, str]]:
    """Everything a check of the whole trail finds: each seal against the one before and the
    keys (``None``: links and hashes only), each batch against its events, stray numbers."""
    found: list[tuple[str, str, str]] = []
    with reading(engine) as conn:
        prev = GENESIS
        for seal in read_seals(conn):  # streamed, while verify_batch queries the same connection
            found += [("seals", str(seal.number), p) for p in verify_seal(seal, prev, keys)]
            found += [(b.table, b.key, b.problem) for b in verify_batch(conn, seal)]
            prev = seal.hash
        found += [("events", f"seal {n}", "stray") for n in stray_seal_numbers(conn)]
    return found


def assert_sealed_exactly_once(engine: Engine, keys: dict[str, VerificationKey]) -> list[Seal]:
    """Every event carries one seal and its own hash; seals are 1..N with no gap, each links
    to the one before and verifies; each seal's count and span are exactly its events'."""
    rows = event_rows(engine)
    with reading(engine) as conn:
        made = list(read_seals(conn))
    assert [seal.number for seal in made] == list(range(1, len(made) + 1))
    unsealed = [row["id"] for row in rows if row["seal"] is None]
    assert unsealed == []
    assert [row["id"] for row in rows if row["hash"] != event_digest(row)] == []
    carried: dict[int, list[int]] = defaultdict(list)
    for row in rows:
        carried[int(row["seal"])].append(int(row["id"]))
    assert sorted(carried) == [seal.number for seal in made]
    for seal in made:
        ids = carried[seal.number]
        assert (seal.count, seal.first_id, seal.last_id) == (len(ids), ids[0], ids[-1]), seal
    assert sum(seal.count for seal in made) == len(rows)
    assert findings(engine, keys) == []
    return made


# --- sealing --------------------------------------------------------------------------------------


def test_seal_pending_seals_committed_events_in_id_order_in_batches_of_the_limit(
        engine: Engine, ring: KeyRing, sign: Sign,
        jwks_keys: dict[str, VerificationKey]) -> None:
    ids = write_events(engine, 12)
    made = seal_batches(engine, sign, limit=5)

    assert [(m.number, m.first_id, m.last_id, m.count) for m in made] == [
        (1, ids[0], ids[4], 5), (2, ids[5], ids[9], 5), (3, ids[10], ids[11], 2)]
    assert [m.prev_hash for m in made] == [GENESIS, made[0].hash, made[1].hash]
    rows = event_rows(engine)
    assert [row["seal"] for row in rows] == [1] * 5 + [2] * 5 + [3] * 2
    assert all(row["hash"] == event_digest(row) for row in rows)
    for seal in made:
        digests = [row["hash"] for row in rows if row["seal"] == seal.number]
        assert seal.batch_hash == hashlib.sha256("\n".join(digests).encode()).hexdigest()
    with reading(engine) as conn:
        assert list(read_seals(conn)) == made  # what was returned is what was written

    kid = ring.active().kid
    for seal in made:  # as a third party checks a seal: the JWKS, PyJWT, the documented form
        header = jwt.get_unverified_header(seal.jws)
        assert (header["kid"], header["typ"], seal.kid) == (kid, SEAL_TYPE, kid)
        key = jwks_keys[header["kid"]]
        claims = jwt.decode(seal.jws, key.key, algorithms=[key.alg])
        assert claims == seal.claims() == {
            "seal": seal.number, "firstId": seal.first_id, "lastId": seal.last_id,
            "count": seal.count, "batchHash": seal.batch_hash, "prevHash": seal.prev_hash,
            "sealedAt": "2026-12-05T12:00:00.123456+00:00", "hash": seal.hash,
            "money": {"transfers": 0, "amount": 0, "posted": {}, "pending": {}}}
        assert documented_seal_hash(claims) == seal.hash
    assert_sealed_exactly_once(engine, jwks_keys)


def test_nothing_to_seal_is_none(engine: Engine, sign: Sign) -> None:
    with writing(engine) as conn:
        assert seal_pending(conn, sign, now=AT) is None  # an empty trail
    write_events(engine, 2)
    assert len(seal_batches(engine, sign, limit=10)) == 1
    with writing(engine) as conn:
        assert seal_pending(conn, sign, now=AT) is None  # everything sealed already
    assert seal_all(engine, sign, clock=utcnow) == []
    with reading(engine) as conn:
        assert conn.execute(select(func.count()).select_from(seals)).scalar_one() == 1


def test_seal_all_seals_everything_waiting_one_seal_per_batch_limit(
        engine: Engine, sign: Sign, jwks_keys: dict[str, VerificationKey]) -> None:
    with writing(engine) as conn:  # one more than a batch, in one transaction
        for n in range(BATCH_LIMIT + 1):
            audit.record(conn, "charge", at=AT, jti=f"tok_{n}", amount=n)
    made = seal_all(engine, sign, clock=lambda: AT)
    assert [(m.number, m.count) for m in made] == [(1, BATCH_LIMIT), (2, 1)]
    write_events(engine, 3)
    assert [(m.number, m.count) for m in seal_all(engine, sign, clock=lambda: AT)] == [(3, 3)]
    assert len(assert_sealed_exactly_once(engine, jwks_keys)) == 3


def test_a_turn_seals_what_was_waiting_not_what_commits_meanwhile(
        pg_engine: Engine, sign: Sign, jwks_keys: dict[str, VerificationKey]) -> None:
    """Paid calls commit events while a sealer seals: the turn ends with its one batch, and
    the events committed meanwhile wait for the next turn. A sealer that went on would seal
    them a few at a time, a whole seal each, for as long as calls keep coming (its clock here
    commits an event each time the sealer reads it, five times: before, seal_all sealed each
    of them in a seal of its own)."""
    write_events(pg_engine, 3)
    committed_meanwhile = 0

    def clock_while_calls_commit() -> datetime:
        nonlocal committed_meanwhile
        if committed_meanwhile < 5:
            committed_meanwhile += 1
            write_events(pg_engine, 1, start=100 + committed_meanwhile)
        return AT

    made = seal_all(pg_engine, sign, clock=clock_while_calls_commit)
    assert [(m.number, m.count) for m in made] == [(1, 3)]
    assert committed_meanwhile == 1
    with reading(pg_engine) as conn:
        assert unsealed_before(conn, AT + timedelta(days=1))[0] == 1
    assert [(m.number, m.count) for m in seal_all(pg_engine, sign, clock=lambda: AT)] == [(2, 1)]
    assert_sealed_exactly_once(pg_engine, jwks_keys)


def test_replicas_threads_leave_sealing_to_the_one_that_seals_until_it_stops(
        engine: Engine, sign: Sign, jwks_keys: dict[str, VerificationKey]) -> None:
    """A background turn (``yield_to_others``) seals nothing when another sealer sealed since
    this one's last turn: one replica seals each second, not every replica. When that one
    stops, the next turn of another seals what is waiting."""
    first, second = (Sealer(engine, sign, utcnow) for _ in range(2))
    write_events(engine, 2)
    assert first.turn(yield_to_others=True) == 2
    assert second.turn(yield_to_others=True) == 0  # its first look: nothing waiting
    write_events(engine, 1, start=10)
    assert first.turn(yield_to_others=True) == 1
    for n in range(3):
        write_events(engine, 1, start=20 + n)
        assert second.turn(yield_to_others=True) == 0  # first sealed since second's last turn
        assert first.turn(yield_to_others=True) == 1
    write_events(engine, 2, start=30)
    assert second.turn(yield_to_others=True) == 0
    assert second.turn(yield_to_others=True) == 2  # first stopped: second takes over
    write_events(engine, 1, start=40)
    assert first.turn() == 1  # an explicit turn (seal(), close()) always seals
    assert len(assert_sealed_exactly_once(engine, jwks_keys)) == 7


def test_an_event_that_commits_late_lands_in_the_next_seal(pg_engine: Engine, sign: Sign,
                                                          jwks_keys: dict[str, Any]) -> None:
    """PostgreSQL takes an id before commit order is known: a sealer seals what is committed,
    and the event with the lower id, committed later, is sealed by the next seal."""
    early = write_events(pg_engine, 1)
    with pg_engine.connect() as late:
        late.begin()
        audit.record(late, "hold", at=AT, jti="tok_late", amount=5)
        late_id = late.execute(select(func.max(e.id))).scalar_one()
        after = write_events(pg_engine, 2, start=1)
        assert after[0] > late_id
        first = seal_all(pg_engine, sign, clock=lambda: AT)
        assert [(m.first_id, m.last_id, m.count) for m in first] == [
            (early[0], after[1], 3)]
        late.commit()
    second = seal_all(pg_engine, sign, clock=lambda: AT)
    assert [(m.number, m.first_id, m.last_id, m.count) for m in second] == [
        (2, late_id, late_id, 1)]
    assert_sealed_exactly_once(pg_engine, jwks_keys)


def test_a_sealer_that_is_not_its_turn_seals_nothing(pg_engine: Engine, sign: Sign) -> None:
    """One sealer at a time on PostgreSQL: while another holds the turn, seal_pending returns
    None and touches nothing; the turn ends with the other's transaction."""
    write_events(pg_engine, 2)
    with pg_engine.connect() as other:
        other.begin()
        assert other.execute(text(
            "SELECT pg_try_advisory_xact_lock(:k, hashtext(current_schema()))"),
            {"k": seals_module._ADVISORY_CLASS}).scalar_one()
        with writing(pg_engine) as conn:
            assert seal_pending(conn, sign, now=AT) is None
        assert seal_all(pg_engine, sign, clock=lambda: AT) == []
        other.rollback()
    assert [m.count for m in seal_all(pg_engine, sign, clock=lambda: AT)] == [2]


def table_scans(engine: Engine, table: str) -> tuple[int, int]:
    """(sequential scans, index scans) PostgreSQL counted on ``table`` in the engine's schema,
    once the backends that ran them have closed (a closing backend reports its counts)."""
    engine.dispose()
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables "
            "WHERE schemaname = current_schema() AND relname = :table"), {"table": table}).one()
    return int(row[0]), int(row[1])


def wait_for_scans(engine: Engine, table: str, before: tuple[int, int]) -> tuple[int, int]:
    """The counts of ``table`` once they show a scan since ``before`` (stats come in late)."""
    deadline = time.monotonic() + 10
    while (now := table_scans(engine, table)) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    return now


def test_a_turn_reads_by_index_when_the_planner_has_no_statistics(
        pg_engine: Engine, sign: Sign) -> None:
    """A young ledger, or a server with autovacuum off, has no statistics: the planner took
    30,000 transfers for about 3,000 and read them all for the 300 a turn names, a scan that
    grew with every paid call. A turn reads, and stamps, events and transfers by index
    whatever it guesses."""
    with writing(pg_engine) as conn:
        for account in ("tenant:filler", "revenue:filler"):
            ops.ensure_account(conn, account, kind="tenant", guarded=False, at=AT)
        conn.execute(text(
            "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind, "
            "code, demo, created_at) SELECT 'charge:filler_' || n, 'tenant:filler', "
            "'revenue:filler', n, 'posted', 'charge', false, :at "
            "FROM generate_series(1, 30000) AS n"), {"at": AT})
        conn.execute(text(  # and as many events sealed before (by a seal 0 that is not kept)
            "INSERT INTO events (at, kind, tenant, amount, ref, demo, seal, hash) "
            "SELECT :at, 'charge', 'filler', n, 'filler_' || n, false, 0, 'x' "
            "FROM generate_series(1, 30000) AS n"), {"at": AT})
        for n in range(1, 301):
            audit.record(conn, "charge", at=AT, jti=f"tok_{n}", tenant="acme",
                         agent="agent-1", tool="search", amount=n, ref=f"filler_{n}",
                         detail={}, demo=False)
    transfers_before = wait_for_scans(pg_engine, "transfers", (-1, -1))
    events_before = table_scans(pg_engine, "events")

    made = seal_all(pg_engine, sign, clock=lambda: AT)

    assert [(m.count, m.money.transfers if m.money else None) for m in made] == [(300, 300)]
    transfers_after = wait_for_scans(pg_engine, "transfers", transfers_before)
    events_after = table_scans(pg_engine, "events")
    assert transfers_after[1] > transfers_before[1]  # the turn's lookup was counted
    assert (transfers_after[0], events_after[0]) == (transfers_before[0], events_before[0])


def test_unsealed_before_counts_old_unsealed_events_and_names_the_oldest(
        engine: Engine, sign: Sign) -> None:
    write_events(engine, 3)  # at AT+0s, +1s, +2s
    seal_batches(engine, sign, limit=10)
    late = write_events(engine, 3, at=AT + timedelta(seconds=10), start=0)  # AT+10s..+12s
    with reading(engine) as conn:
        assert unsealed_before(conn, AT + timedelta(seconds=10)) == (0, None)
        assert unsealed_before(conn, AT + timedelta(seconds=11, microseconds=500)) == (
            2, late[0])
        assert unsealed_before(conn, AT + timedelta(hours=1)) == (3, late[0])
    seal_batches(engine, sign, limit=10)
    with reading(engine) as conn:
        assert unsealed_before(conn, AT + timedelta(hours=1)) == (0, None)


# --- tampering: one test per attack ------------------------------------------------------------


@pytest.fixture
def sealed(engine: Engine, sign: Sign) -> list[int]:
    """Nine events in three seals of three: seal 1 = ids[0:3], 2 = ids[3:6], 3 = ids[6:9]."""
    ids = write_events(engine, 9)
    assert [m.count for m in seal_batches(engine, sign, limit=3)] == [3, 3, 3]
    return ids


def rehash(conn: Connection, event_id: int) -> None:
    """Write an event's own hash again, as someone who read seals.py would after editing it."""
    row = conn.execute(select(e.id, *(e[f] for f in EVENT_FIELDS))
                       .where(e.id == event_id)).mappings().one()
    conn.execute(update(events).where(e.id == event_id).values(hash=event_digest(dict(row))))


CHANGED = "changed after seal {} took it"
REORDERED = ("its events no longer hash to its batch hash (an event was reordered or rewritten "
             "with its hash)")
EDITED = "its hash does not match its fields (the seal was edited)"
COVERS = "its signature covers other fields than the seal's"
UNLINKED = "does not link to the seal before it (a seal was removed, added or rewritten)"
BAD_SIGNATURE = "its signature does not verify"


def miscounted(number: int, count: int, first: int, last: int, carried: int) -> str:
    return (f"holds {count} events ({first}..{last}) but {carried} carry its number: events "
            "were inserted or deleted")


def test_an_untouched_trail_has_no_findings(engine: Engine, sealed: list[int],
                                            jwks_keys: dict[str, Any]) -> None:
    assert findings(engine, jwks_keys) == []


def test_an_edited_event_is_found(engine: Engine, sealed: list[int],
                                  jwks_keys: dict[str, Any]) -> None:
    with engine.begin() as conn:  # the amount changed, the hash kept
        conn.execute(update(events).where(e.id == sealed[4]).values(amount=1))
    assert findings(engine, jwks_keys) == [
        ("events", str(sealed[4]), CHANGED.format(2)), ("seals", "2", REORDERED)]


@pytest.mark.parametrize("field, value", [("kind", "void"), ("tenant", "mallory"),
                                          ("at", AT + timedelta(days=1)), ("demo", True),
                                          ("detail", None), ("ref", "rcpt_other")])
def test_an_event_edited_and_rehashed_is_found_by_its_batch(
        engine: Engine, sealed: list[int], jwks_keys: dict[str, Any], field: str,
        value: Any) -> None:
    with engine.begin() as conn:
        conn.execute(update(events).where(e.id == sealed[5]).values({field: value}))
        rehash(conn, sealed[5])
    assert findings(engine, jwks_keys) == [("seals", "2", REORDERED)]


def test_an_inserted_event_stamped_with_an_existing_seal_is_found(
        engine: Engine, sealed: list[int], jwks_keys: dict[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(insert(events).values(at=AT, kind="charge", jti="tok_forged", amount=1,
                                           demo=False, seal=2))
        forged = conn.execute(select(func.max(e.id))).scalar_one()
        rehash(conn, forged)
    assert findings(engine, jwks_keys) == [
        ("seals", "2", miscounted(2, 3, sealed[3], sealed[5], 4))]


@pytest.mark.parametrize("position", [0, 3, 4, 5, 8])
def test_a_deleted_event_is_found(engine: Engine, sealed: list[int],
                                  jwks_keys: dict[str, Any], position: int) -> None:
    with engine.begin() as conn:
        conn.execute(delete(events).where(e.id == sealed[position]))
    number = position // 3 + 1
    first, last = sealed[(number - 1) * 3], sealed[(number - 1) * 3 + 2]
    assert findings(engine, jwks_keys) == [
        ("seals", str(number), miscounted(number, 3, first, last, 2))]


def swap_contents(conn: Connection, one: int, other: int, *, with_hashes: bool) -> None:
    """Exchange two events' contents between their ids (and their hashes, or rewrite them)."""
    columns = [*(e[f] for f in EVENT_FIELDS), e.hash, e.seal]
    rows = {row.id: row._mapping for row in conn.execute(
        select(e.id, *columns).where(e.id.in_([one, other])))}
    for mine, theirs in ((one, other), (other, one)):
        values = {c.name: rows[theirs][c.name] for c in columns if c.name != "seal"}
        conn.execute(update(events).where(e.id == mine).values(values))
    if not with_hashes:
        rehash(conn, one)
        rehash(conn, other)


def test_two_swapped_events_are_found(engine: Engine, sealed: list[int],
                                      jwks_keys: dict[str, Any]) -> None:
    with engine.begin() as conn:
        swap_contents(conn, sealed[3], sealed[4], with_hashes=True)
    assert findings(engine, jwks_keys) == [
        ("events", str(sealed[3]), CHANGED.format(2)),
        ("events", str(sealed[4]), CHANGED.format(2)), ("seals", "2", REORDERED)]


def test_two_swapped_events_with_their_hashes_rewritten_are_found(
        engine: Engine, sealed: list[int], jwks_keys: dict[str, Any]) -> None:
    with engine.begin() as conn:  # across two seals: each seal keeps its count and span
        swap_contents(conn, sealed[2], sealed[3], with_hashes=False)
    assert findings(engine, jwks_keys) == [("seals", "1", REORDERED), ("seals", "2", REORDERED)]


@pytest.mark.parametrize("field, value, found", [
    ("sealed_at", AT + timedelta(hours=1), [EDITED, COVERS]),
    ("batch_hash", "0" * 64, [EDITED, COVERS]),
    ("first_id", "next", [EDITED, COVERS]),
    ("prev_hash", "1" * 64, [UNLINKED, EDITED, COVERS]),
    ("hash", "2" * 64, [EDITED, COVERS]),
])
def test_an_edited_seal_field_is_found(engine: Engine, sealed: list[int],
                                       jwks_keys: dict[str, Any], field: str, value: Any,
                                       found: list[str]) -> None:
    if value == "next":
        value = sealed[4]
    with engine.begin() as conn:
        conn.execute(update(seals).where(s.number == 2).values({field: value}))
    result = findings(engine, jwks_keys)
    assert [p for table, key, p in result if (table, key) == ("seals", "2")] == found + (
        [miscounted(2, 3, sealed[4], sealed[5], 3)] if field == "first_id"
        else [REORDERED] if field == "batch_hash" else [])
    rest = [(table, key) for table, key, _ in result if (table, key) != ("seals", "2")]
    assert rest == ([("seals", "3")] if field == "hash" else [])  # seal 3 links to the old hash


def rewritten(seal: Seal, **changes: Any) -> dict[str, Any]:
    """``seal``'s signed claims with ``changes``, and its hash recomputed as documented."""
    claims = {**seal.claims(), **changes}
    return {**claims, "hash": documented_seal_hash(claims)}


def forge(conn: Connection, number: int, claims: dict[str, Any], *, kid: str, jws: str) -> None:
    conn.execute(update(seals).where(s.number == number).values(
        batch_hash=claims["batchHash"], prev_hash=claims["prevHash"], hash=claims["hash"],
        kid=kid, jws=jws))


def sign_as(key: Any, kid: str, claims: dict[str, Any]) -> str:
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid, "typ": SEAL_TYPE})


def test_a_seal_re_signed_with_a_key_the_operator_does_not_hold_is_found(
        engine: Engine, sealed: list[int], jwks_keys: dict[str, Any], tmp_path: Path) -> None:
    attacker = new_ring(tmp_path / "attacker")
    info, key = attacker.signing_key()
    with reading(engine) as conn:
        [seal] = read_seals(conn, first=2, last=2)
    with engine.begin() as conn:
        claims = seal.claims()
        forge(conn, 2, claims, kid=info.kid, jws=sign_as(key, info.kid, claims))
    assert findings(engine, jwks_keys) == [
        ("seals", "2", f"signed by key {info.kid!r}, which the key ring does not hold")]


def test_a_seal_re_signed_under_the_operators_kid_with_another_key_is_found(
        engine: Engine, sealed: list[int], jwks_keys: dict[str, Any], tmp_path: Path) -> None:
    _, key = new_ring(tmp_path / "attacker").signing_key()
    with reading(engine) as conn:
        [seal] = read_seals(conn, first=2, last=2)
    with engine.begin() as conn:
        claims = seal.claims()
        forge(conn, 2, claims, kid=seal.kid, jws=sign_as(key, seal.kid, claims))
    assert findings(engine, jwks_keys) == [("seals", "2", BAD_SIGNATURE)]


def rechain(conn: Connection, sign: Callable[[dict[str, Any]], tuple[str, str]]) -> None:
    """What someone with write access does after editing events: recompute every event's
    hash, every batch hash, every seal's hash and link, and sign every seal with ``sign``."""
    prev = GENESIS
    for seal in list(read_seals(conn)):
        ids = conn.execute(select(e.id).where(e.seal == seal.number).order_by(e.id)).scalars()
        digests = []
        for event_id in list(ids):
            rehash(conn, event_id)
            digests.append(conn.execute(select(e.hash).where(e.id == event_id)).scalar_one())
        claims = rewritten(seal, batchHash=batch_hash(digests), prevHash=prev)
        kid, jws = sign(claims)
        forge(conn, seal.number, claims, kid=kid, jws=jws)
        prev = claims["hash"]


def test_a_history_rewritten_and_rechained_consistently_is_found_by_its_signatures(
        engine: Engine, sealed: list[int], jwks_keys: dict[str, Any], tmp_path: Path) -> None:
    """Every link and hash recomputed: only the signature check against the operator's JWKS
    can tell, and it fails on every seal (the attacker signs under the operator's kid)."""
    _, key = new_ring(tmp_path / "attacker").signing_key()
    kid = next(iter(jwks_keys))
    with engine.begin() as conn:  # an amount lowered, an event removed, every hash redone
        conn.execute(update(events).where(e.id == sealed[1]).values(amount=1))
        conn.execute(delete(events).where(e.id == sealed[7]))
        conn.execute(update(seals).where(s.number == 3).values(count=2))
        rechain(conn, lambda claims: (kid, sign_as(key, kid, claims)))
    assert findings(engine, None) == []  # consistent: links and hashes alone cannot tell
    assert findings(engine, jwks_keys) == [
        ("seals", "1", BAD_SIGNATURE), ("seals", "2", BAD_SIGNATURE),
        ("seals", "3", BAD_SIGNATURE)]


def test_a_seal_rewritten_without_the_key_breaks_its_signature_and_the_next_link(
        engine: Engine, sealed: list[int], jwks_keys: dict[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(update(events).where(e.id == sealed[4]).values(amount=1))
        rehash(conn, sealed[4])
        [seal] = read_seals(conn, first=2, last=2)
        digests = conn.execute(select(e.hash).where(e.seal == 2).order_by(e.id)).scalars()
        claims = rewritten(seal, batchHash=batch_hash(list(digests)))
        forge(conn, 2, claims, kid=seal.kid, jws=seal.jws)  # the old signature kept
    assert findings(engine, jwks_keys) == [("seals", "2", COVERS), ("seals", "3", UNLINKED)]


def test_a_deleted_last_seal_leaves_a_stray_seal_number(engine: Engine, sealed: list[int],
                                                        jwks_keys: dict[str, Any]) -> None:
    """The chain before it still links: only the events that carry its number tell."""
    with engine.begin() as conn:
        conn.execute(delete(seals).where(s.number == 3))
    assert findings(engine, jwks_keys) == [("events", "seal 3", "stray")]


def test_a_deleted_middle_seal_breaks_the_link_and_leaves_a_stray_number(
        engine: Engine, sealed: list[int], jwks_keys: dict[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(delete(seals).where(s.number == 2))
    assert findings(engine, jwks_keys) == [("seals", "3", UNLINKED),
                                           ("events", "seal 2", "stray")]


def test_an_event_forged_with_an_unknown_seal_number_is_a_stray(
        engine: Engine, sealed: list[int], jwks_keys: dict[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(insert(events).values(at=AT, kind="charge", amount=1, demo=False, seal=99))
    with reading(engine) as conn:
        assert stray_seal_numbers(conn) == [99]
    assert findings(engine, jwks_keys) == [("events", "seal 99", "stray")]


# --- sealers racing ------------------------------------------------------------------------------

WRITERS = 4
CHARGES = {"sqlite": 40, "postgresql": 80}  # per writer thread
SEALER_THREADS = 3
# How long the late writer keeps its event uncommitted. SQLite's write lock serialises ids and
# commits anyway (and every other writer waits that long), so it only adds a writer there.
LATE_COMMIT = {"sqlite": 0.0, "postgresql": 0.005}
SEALER_PROCESSES = 3


class Overlap:
    """The most sealers inside ``seal_all`` at once: proof that they raced for turns, whoever
    won them (a sealer keeps its turn while events keep coming, so one may win them all)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self.most = 0

    @contextmanager
    def inside(self) -> Iterator[None]:
        with self._lock:
            self._inside += 1
            self.most = max(self.most, self._inside)
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1


def seal_in_a_loop(engine: Engine, sign: Sign, stop: threading.Event | Any,
                   overlap: Overlap | None = None) -> int:
    """Seal whatever is waiting until ``stop``; the seals this sealer made."""
    made = 0
    while not stop.is_set():
        with overlap.inside() if overlap else nullcontext():
            made += len(seal_all(engine, sign, clock=utcnow))
        time.sleep(0.001)
    return made


def seal_until_stopped(db_url: str, keys_dir: str, ready: Any, stop: Any, made: Any) -> None:
    """A sealer process (spawned): its own engine and key ring, as a replica has."""
    engine = make_engine(db_url)
    info, key = KeyRing.load(Path(keys_dir)).signing_key()
    try:
        ready.put("ready")
        made.put(seal_in_a_loop(engine, signer(info.alg, info.kid, key), stop))
    finally:
        engine.dispose()


def run_all(work: list[Callable[[], Any]]) -> list[Any]:
    """Run each callable in a thread of its own, released together; results, or the first
    exception."""
    return run_threads(len(work), lambda index: work[index](), indexed=True, timeout=300)


def charges_and_late_commits(engine: Engine, ring: KeyRing, keys_dir: Path,
                             stop: threading.Event) -> list[Callable[[], Any]]:
    """Writers: threads charging through a real Verifier (unique args and keys, a token each),
    and one that commits events late (its id taken well before its commit); each last
    writer to finish sets ``stop``."""
    fund(engine, "acme", 100 * USDC, now=utcnow())
    tokens = [mint(engine, ring, now=utcnow(), limit=10 * USDC, agent=f"agent-{n}")
              for n in range(WRITERS)]
    verifier = Verifier(keys=KeySource(directory=keys_dir),
                        pricing=PricingTable.from_document(PRICING_DOC), engine=engine)
    charges = CHARGES[engine.dialect.name]
    left = [WRITERS]
    lock = threading.Lock()

    def done() -> None:
        with lock:
            left[0] -= 1
            if left[0] == 0:
                stop.set()

    def charge(token: IssuedToken) -> int:
        try:
            for n in range(charges):
                verifier.charge(token.token, "search", args={"n": n, "agent": token.claims.agent},
                                idempotency_key=f"{token.claims.jti}-{n}")
        finally:
            done()
        return charges

    def late() -> int:
        written = 0
        while not stop.is_set():
            with writing(engine) as conn:
                audit.record(conn, "hold", at=utcnow(), jti="tok_late", amount=written)
                time.sleep(LATE_COMMIT[engine.dialect.name])
            written += 1
            time.sleep(0.001)
        return written

    return [*(lambda t=t: charge(t) for t in tokens), late]


def assert_no_fork(engine: Engine, ring: KeyRing, made: list[int], charged: list[int], *,
                   raced: bool) -> None:
    seal_all(engine, sign_of(ring), clock=utcnow)  # what the last turns left
    keys = keys_from_jwks(ring.jwks())
    final = assert_sealed_exactly_once(engine, keys)
    with reading(engine) as conn:
        charge_events = conn.execute(select(func.count()).where(e.kind == "charge")
                                     ).scalar_one()
    assert charge_events == sum(charged) == WRITERS * CHARGES[engine.dialect.name]
    assert sum(made) <= len(final)
    assert raced, f"sealers did not race: {made}"
    if engine.dialect.name == "postgresql":  # ids are taken before commit order is known
        late = [(a.number, b.number) for a, b in zip(final, final[1:], strict=False)
                if b.first_id < a.last_id]
        assert late, "no event committed after a later id was sealed: the test proves nothing"


def sign_of(ring: KeyRing) -> Sign:
    info, key = ring.signing_key()
    return signer(info.alg, info.kid, key)


@pytest.mark.slow
def test_sealer_threads_beside_paid_calls_never_fork_the_chain(engine: Engine, ring: KeyRing,
                                                               tmp_path: Path) -> None:
    stop = threading.Event()
    writers = charges_and_late_commits(engine, ring, tmp_path / "keys", stop)
    overlap = Overlap()
    sealers = [lambda: seal_in_a_loop(engine, sign_of(ring), stop, overlap)
               for _ in range(SEALER_THREADS)]
    results = run_all([*writers, *sealers])
    assert_no_fork(engine, ring, results[len(writers):], results[:WRITERS],
                   raced=overlap.most >= 2)


@pytest.mark.slow
def test_sealer_processes_and_threads_on_postgres_never_fork_the_chain(
        pg_engine: Engine, ring: KeyRing, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready, made, stop_processes = ctx.Queue(), ctx.Queue(), ctx.Event()
    url = pg_engine.url.render_as_string(hide_password=False)
    processes = [ctx.Process(target=seal_until_stopped,
                             args=(url, str(tmp_path / "keys"), ready, stop_processes, made))
                 for _ in range(SEALER_PROCESSES)]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            assert ready.get(timeout=60) == "ready"
        stop = threading.Event()
        writers = charges_and_late_commits(pg_engine, ring, tmp_path / "keys", stop)
        sealers = [lambda: seal_in_a_loop(pg_engine, sign_of(ring), stop)
                   for _ in range(SEALER_THREADS)]
        results = run_all([*writers, *sealers])
        stop_processes.set()
        by_process = [made.get(timeout=60) for _ in processes]
    finally:
        stop_processes.set()
        for process in processes:
            process.join(60)
    assert [process.exitcode for process in processes] == [0] * SEALER_PROCESSES
    assert sum(by_process) > 0, "no sealer process ever had the turn"
    made_by = [*results[len(writers):], *by_process]
    assert_no_fork(pg_engine, ring, made_by, results[:WRITERS],
                   raced=sum(1 for count in made_by if count > 0) >= 2)


# --- no row that every paid call locks --------------------------------------------------------

LOCK_WAIT = "2s"  # what a regression waits before it fails, instead of hanging


def a_call(token: IssuedToken, n: int) -> calls.NewCall:
    claims = token.claims
    return calls.NewCall(
        id=calls.new_call_id(), idempotency_key=f"lock-{n}", request_hash=f"{n:064x}",
        jti=claims.jti, tenant=claims.tenant, agent=claims.agent, tool="search", units=None,
        amount=PRICE, pricing_version=1, price_rule="tools.search", demo=False)


def open_call(conn: Connection, step: str, call: calls.NewCall) -> None:
    """What the verifier's hold or charge writes, inside ``conn``'s transaction."""
    now = utcnow()
    if step == "charge":
        debited = calls.debit_charge(conn, call, at=now)
        assert isinstance(debited, calls.Opened), debited
        assert calls.record_charge(conn, call, at=now, receipt=f"receipt-{call.id}") is None
    else:
        held = calls.hold(conn, call, at=now, timeout_at=now + timedelta(minutes=5))
        assert isinstance(held, calls.Opened), held


def impatient(engine: Engine, wait: str = LOCK_WAIT) -> Engine:
    """An engine on the same ledger whose statements give up after ``wait`` on a lock."""
    url = make_url(engine.url.render_as_string(hide_password=False))
    options = f"{url.query.get('options', '')} -clock_timeout={wait}".strip()
    return make_engine(url.update_query_dict({"options": options})
                       .render_as_string(hide_password=False))


@pytest.fixture
def two_tokens(pg_engine: Engine, ring: KeyRing) -> list[IssuedToken]:
    fund(pg_engine, "acme", 10 * USDC, now=utcnow())
    return [mint(pg_engine, ring, now=utcnow(), limit=USDC, agent=f"agent-{n}")
            for n in range(2)]


def revenue(engine: Engine, account: str) -> tuple[int, int]:
    with reading(engine) as conn:
        row = conn.execute(select(accounts.c.credits_posted, accounts.c.credits_pending)
                           .where(accounts.c.id == account)).one()
    return int(row[0]), int(row[1])


@pytest.mark.parametrize("first_step", ["charge", "hold"])
@pytest.mark.parametrize("second_step", ["charge", "hold"])
def test_paid_calls_of_two_tokens_commit_while_each_other_is_open(
        pg_engine: Engine, two_tokens: list[IssuedToken], first_step: str,
        second_step: str) -> None:
    """The old audit_head row (and the shared revenue row) made the second wait for the
    first's commit; now nothing is shared and the second commits first."""
    second_engine = impatient(pg_engine)
    try:
        with pg_engine.connect() as first:
            first.begin()
            open_call(first, first_step, a_call(two_tokens[0], 1))  # not committed yet
            started = time.monotonic()
            with writing(second_engine) as conn:
                open_call(conn, second_step, a_call(two_tokens[1], 2))
            assert time.monotonic() - started < 1.0
            first.commit()
    finally:
        second_engine.dispose()
    with reading(pg_engine) as conn:
        assert conn.execute(select(func.count()).where(e.kind.in_(("charge", "hold")))
                            ).scalar_one() == 2
    for token, step in zip(two_tokens, (first_step, second_step), strict=True):
        earned = (PRICE, 0) if step == "charge" else (0, PRICE)
        assert revenue(pg_engine, ops.revenue_account(token.claims.jti)) == earned
    assert revenue(pg_engine, ops.REVENUE) == (0, 0)  # the shared account of old: untouched


def test_a_second_call_of_the_same_token_does_wait(pg_engine: Engine,
                                                   two_tokens: list[IssuedToken]) -> None:
    """The method above does catch a wait: a call of the same token needs the token's row."""
    second_engine = impatient(pg_engine, "200ms")
    try:
        with pg_engine.connect() as first:
            first.begin()
            open_call(first, "charge", a_call(two_tokens[0], 1))
            with pytest.raises(LedgerUnavailable, match="lock timeout"), \
                    writing(second_engine) as conn:
                open_call(conn, "charge", a_call(two_tokens[0], 2))
            first.rollback()
    finally:
        second_engine.dispose()


def test_a_refusal_of_a_valid_token_is_recorded_while_a_paid_call_is_open(
        pg_engine: Engine, ring: KeyRing, tmp_path: Path,
        two_tokens: list[IssuedToken]) -> None:
    narrow = mint(pg_engine, ring, now=utcnow(), limit=USDC, scope=["status"])
    second_engine = impatient(pg_engine)
    verifier = Verifier(keys=KeySource(directory=tmp_path / "keys"),
                        pricing=PricingTable.from_document(PRICING_DOC), engine=second_engine)
    verifier.preflight(two_tokens[1].token, "status")  # records the pricing table first
    try:
        with pg_engine.connect() as first:
            first.begin()
            open_call(first, "charge", a_call(two_tokens[0], 1))
            started = time.monotonic()
            with pytest.raises(ScopeDenied):
                verifier.charge(narrow.token, "search")
            receipt = verifier.charge(two_tokens[1].token, "search")
            assert time.monotonic() - started < 1.0
            first.commit()
    finally:
        verifier.close()
    with reading(pg_engine) as conn:
        rows = conn.execute(select(e.kind, e.code, e.jti).order_by(e.id)).all()
    assert [tuple(row) for row in rows if row.kind in ("refusal", "charge")] == [
        ("charge", None, two_tokens[0].claims.jti),
        ("refusal", "SCOPE_DENIED", narrow.claims.jti),
        ("charge", None, two_tokens[1].claims.jti)]
    assert receipt.claims["jti"] == two_tokens[1].claims.jti


def test_an_over_budget_charge_beside_an_open_call_is_refused_at_once(
        pg_engine: Engine, two_tokens: list[IssuedToken]) -> None:
    """A refusal needs no lock the open call holds either; the open call commits after it."""
    second_engine = impatient(pg_engine)
    try:
        with pg_engine.connect() as first:
            first.begin()
            open_call(first, "hold", a_call(two_tokens[0], 1))
            big = replace(a_call(two_tokens[1], 2), amount=2 * USDC)
            with second_engine.connect() as conn:
                conn.begin()
                refused = calls.debit_charge(conn, big, at=utcnow())
                conn.rollback()  # as the verifier does with a step that did not go through
            assert refused == calls.Refused("funds", available=USDC)
            first.commit()
    finally:
        second_engine.dispose()
    assert revenue(pg_engine, ops.revenue_account(two_tokens[0].claims.jti)) == (0, PRICE)
    assert revenue(pg_engine, ops.revenue_account(two_tokens[1].claims.jti)) == (0, 0)
