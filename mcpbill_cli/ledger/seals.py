"""Sealing the audit trail: committed events chained in signed batches.

Writers append events with no shared lock (``audit.record``), so no row orders them all and
ids are taken before commit order is known. A sealer, one at a time, takes the committed,
unsealed events in id order (a late commit simply lands in the next batch) and writes a seal:

    number, first_id, last_id, count      which events (every event stamped with ``number``)
    batch_hash = sha256("\\n".join(the events' own hashes, in id order))
    prev_hash  = the previous seal's hash (GENESIS for the first)
    money      = the transfers its events name, summed per class of account (``seal_money``):
                 each set of nets sums to zero
    hash       = sha256(the canonical JSON of the above and ``sealed_at``)
    jws        = those claims signed with the operator's key (``keys export-jwks`` verifies)

and stamps each event with the seal's number and its own hash (``audit.event_digest``). An
edited, inserted, deleted or reordered event no longer hashes to its seal's batch hash; a
rewritten seal no longer links, or no longer carries a signature that verifies, so someone
who can write to the database but has no signing key cannot rewrite history consistently.

One sealer at a time: on PostgreSQL a transaction-level advisory lock (others skip their
turn), on SQLite the write lock; the seal number is a primary key besides. Sealers run in
every verifier process (every ``SEAL_INTERVAL``) and from ``mcpbill audit seal``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jwt
from sqlalchemy import Connection, func, insert, select, text

from mcpbill_cli.clock import aware
from mcpbill_cli.keys import VerificationKey
from mcpbill_cli.ledger.audit import EVENT_FIELDS, GENESIS, event_digest, row_digest, utc_text
from mcpbill_cli.ledger.models import events, seals
from mcpbill_cli.ledger.seal_money import Money, money_of, named_transfer

SEAL_TYPE = "mcpbill-seal+jwt"
SEAL_INTERVAL = 1.0  # seconds between a verifier's sealer runs
UNSEALED_WINDOW = 5  # seconds: an event older than this and still unsealed is a finding
BATCH_LIMIT = 5000  # events per seal
_ADVISORY_CLASS = 0x6D6362  # "mcb": with the schema's hash, the lock of a ledger's sealing turn

e = events.c
s = seals.c
# A batch's events stamped in one statement, each with its own hash, by dialect: a statement
# per event cost a sealer about 6 us of CPU per event on SQLite and 12-25 us on PostgreSQL
# (psycopg's executemany), besides the server's own per-statement work, all of it on the
# cores paid calls run on. A row some other sealer stamped first is not counted. On SQLite the
# ``+`` keeps the planner off ``ix_events_seal``: driven by that index it scanned the whole
# batch once per event (360 us an event); driven by the batch it finds each event by its id.
_STAMP = {
    "sqlite": text(
        "UPDATE events SET seal = :seal, hash = stamp.value FROM json_each(:hashes) AS stamp "
        "WHERE events.id = CAST(stamp.key AS INTEGER) AND +events.seal IS NULL"),
    "postgresql": text(
        "UPDATE events SET seal = :seal, hash = stamp.hash "
        "FROM unnest(CAST(:ids AS BIGINT[]), CAST(:hashes AS VARCHAR[])) AS stamp(id, hash) "
        "WHERE events.id = stamp.id AND events.seal IS NULL"),
}

# claims -> (kid, jws): the operator's signature over a seal
Sign = Callable[[dict[str, Any]], tuple[str, str]]


@dataclass(frozen=True)
class Seal:
    number: int
    first_id: int
    last_id: int
    count: int
    batch_hash: str
    prev_hash: str
    hash: str
    sealed_at: datetime
    kid: str
    jws: str
    money: Money | None = None  # None: sealed before seals carried their money (0008)

    def claims(self) -> dict[str, Any]:
        """What the seal's JWS signs (and ``seals export`` writes), ``hash`` included."""
        return {**_hashed_fields(self.number, self.first_id, self.last_id, self.count,
                                 self.batch_hash, self.prev_hash, self.sealed_at, self.money),
                "hash": self.hash}

    def to_dict(self) -> dict[str, Any]:
        return {**self.claims(), "kid": self.kid, "jws": self.jws}


def signer(alg: str, kid: str, key: Any) -> Sign:
    """A :data:`Sign` with the operator's signing key (as the key ring hands it out)."""

    def sign(claims: dict[str, Any]) -> tuple[str, str]:
        return kid, jwt.encode(claims, key, algorithm=alg, headers={"kid": kid,
                                                                    "typ": SEAL_TYPE})

    return sign


@dataclass(frozen=True)
class Pending:
    """Committed, unsealed events read (in id order) and hashed, ready to be sealed."""

    ids: list[int]
    digests: list[str]
    money: Money


def take_pending(conn: Connection, *, limit: int = BATCH_LIMIT) -> Pending | None:
    """Up to ``limit`` unsealed events and their own hashes; any transaction will do (a
    sealer hashes before it takes the write lock, so paid calls never wait for the hashing).

    On PostgreSQL both reads go by index whatever the planner's statistics say
    (:func:`_by_index`)."""
    _by_index(conn)
    rows = conn.execute(select(e.id, *(e[name] for name in EVENT_FIELDS))
                        .where(e.seal.is_(None)).order_by(e.id).limit(limit)).all()
    if not rows:
        return None
    named = [name for row in rows
             if (name := named_transfer(row.kind, row.ref, row.jti)) is not None]
    return Pending([int(row.id) for row in rows], [row_digest(row) for row in rows],
                   money_of(conn, named))


def _by_index(conn: Connection) -> None:
    """PostgreSQL: plain index scans for the rest of this transaction.

    A sealer looks up at most a batch of rows by key: the unsealed events through
    ``ix_events_seal`` and the transfers they name by primary key. Where the statistics lag the
    table (a young ledger, a server with autovacuum off: the planner guessed 2,655 rows of a
    33,000-row ``transfers``), PostgreSQL read the whole table for the 300 keys of a turn:
    38 ms at 33,000 rows and growing with every call, once a second per deployment. Plain index
    scans (not bitmap scans) also mark the index entries of events already stamped as dead, so
    later turns skip them even where no vacuum runs.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(_INDEX_ONLY)


_INDEX_ONLY = text("SELECT set_config('enable_seqscan', 'off', true), "
                   "set_config('enable_bitmapscan', 'off', true)")


def write_seal(conn: Connection, pending: Pending, sign: Sign, *, now: datetime,
               wait: bool = False) -> Seal | None:
    """Seal ``pending`` inside the caller's write transaction: ``None`` while another sealer
    has the turn (``wait``: wait for it); SealRace if another sealer took some of them."""
    if not _my_turn(conn, wait=wait):
        return None
    last = conn.execute(select(s.number, s.hash).order_by(s.number.desc()).limit(1)).first()
    number = 1 if last is None else int(last.number) + 1
    fields = _hashed_fields(number, pending.ids[0], pending.ids[-1], len(pending.ids),
                            batch_hash(pending.digests), GENESIS if last is None else last.hash,
                            now, pending.money)
    digest = _seal_hash(fields)
    kid, jws = sign({**fields, "hash": digest})
    seal = Seal(number, pending.ids[0], pending.ids[-1], len(pending.ids), fields["batchHash"],
                fields["prevHash"], digest, now, kid, jws, pending.money)
    conn.execute(insert(seals).values(
        number=number, first_id=seal.first_id, last_id=seal.last_id, count=seal.count,
        batch_hash=seal.batch_hash, prev_hash=seal.prev_hash, hash=digest, sealed_at=now,
        kid=kid, jws=jws, money=pending.money.to_json()))
    if _stamp(conn, number, pending) != len(pending.ids):  # another sealer got there: roll
        # this one back
        raise SealRace(number)
    return seal


def seal_pending(conn: Connection, sign: Sign, *, now: datetime,
                 limit: int = BATCH_LIMIT, wait: bool = False) -> Seal | None:
    """Seal up to ``limit`` committed, unsealed events, all inside the caller's write
    transaction; ``None`` when there is nothing to seal or another sealer holds the turn."""
    pending = take_pending(conn, limit=limit)
    return None if pending is None else write_seal(conn, pending, sign, now=now, wait=wait)


class SealRace(Exception):  # noqa: N818 - rolls a sealer's transaction back, never leaves it
    """Another sealer stamped some of these events first."""


def batch_hash(digests: list[str]) -> str:
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


# --- verifying --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SealBreak:
    """A place where the sealed trail does not hold: the seal (or event) and what is wrong."""

    table: str
    key: str
    problem: str


def read_seals(conn: Connection, *, first: int = 1, last: int | None = None,
               page: int = 1000) -> Iterator[Seal]:
    """The seals numbered ``first``..``last``, in order, read ``page`` at a time (no cursor
    is left open by a caller that stops early)."""
    after = first - 1
    while True:
        query = select(seals).where(s.number > after).order_by(s.number).limit(page)
        if last is not None:
            query = query.where(s.number <= last)
        rows = conn.execute(query).all()
        for row in rows:
            yield Seal(int(row.number), int(row.first_id), int(row.last_id),
                       int(row._mapping["count"]), row.batch_hash, row.prev_hash, row.hash,
                       aware(row.sealed_at), row.kid, row.jws, Money.from_json(row.money))
        if len(rows) < page:
            return
        after = int(rows[-1].number)


def verify_seal(seal: Seal, prev_hash: str, keys: Mapping[str, VerificationKey] | None
                ) -> Iterator[str]:
    """What is wrong with ``seal`` itself: its link, its hash, its signature (``keys``:
    ``None`` skips the signature)."""
    if seal.prev_hash != prev_hash:
        yield "does not link to the seal before it (a seal was removed, added or rewritten)"
    fields = _hashed_fields(seal.number, seal.first_id, seal.last_id, seal.count,
                            seal.batch_hash, seal.prev_hash, seal.sealed_at, seal.money)
    if _seal_hash(fields) != seal.hash:
        yield "its hash does not match its fields (the seal was edited)"
    if keys is not None:
        problem = _signature_problem(seal, keys)
        if problem:
            yield problem


# How SQLAlchemy's DateTime keeps a time in a SQLite file, the only text a sealer wrote there.
_STORED_AT = ("[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] "
              "[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]")
_RESTATED = text("SELECT id, at FROM events WHERE seal = :seal "
                 "AND (typeof(at) != 'text' OR at NOT GLOB :stored) ORDER BY id")


def verify_batch(conn: Connection, seal: Seal) -> Iterator[SealBreak]:
    """The events stamped with ``seal``: their count, span and hashes against the seal.

    On SQLite a time is text: one restated in another form (the same instant with a UTC
    offset, ``2026-12-06 00:00:59.9+00:01``) hashes as the sealed one, yet windows compare the
    text and would count the event on another day. Any time not in the form written is a
    change."""
    if conn.dialect.name == "sqlite":
        for event_id, stored in conn.execute(_RESTATED, {"seal": seal.number,
                                                         "stored": _STORED_AT}):
            yield SealBreak("events", str(event_id), f"its time is stored as {stored!r}, not "
                                                     "as its sealer wrote it (restated to move "
                                                     "it to another day?)")
    rows = conn.execute(select(e.id, e.hash, *(e[name] for name in EVENT_FIELDS))
                        .where(e.seal == seal.number).order_by(e.id)).mappings().all()
    digests = []
    for row in rows:
        try:
            digest = event_digest(dict(row))
        except (TypeError, ValueError):  # a value no sealer wrote (SQLite: a BLOB in a text field)
            digest = ""
        digests.append(digest)
        if row["hash"] != digest:
            yield SealBreak("events", str(row["id"]), f"changed after seal {seal.number} "
                                                      "took it")
    span = (rows[0]["id"], rows[-1]["id"]) if rows else None
    if len(rows) != seal.count or span != (seal.first_id, seal.last_id):
        yield SealBreak("seals", str(seal.number),
                        f"holds {seal.count} events ({seal.first_id}..{seal.last_id}) but "
                        f"{len(rows)} carry its number: events were inserted or deleted")
    elif batch_hash(digests) != seal.batch_hash:
        yield SealBreak("seals", str(seal.number), "its events no longer hash to its batch "
                                                   "hash (an event was reordered or rewritten "
                                                   "with its hash)")


def last_seal_number(conn: Connection) -> int:
    """The newest seal's number (0 before the first seal)."""
    return int(conn.execute(select(func.coalesce(func.max(s.number), 0))).scalar_one())


def unsealed_before(conn: Connection, moment: datetime) -> tuple[int, int | None]:
    """How many events written before ``moment`` are still unsealed, and the oldest one's id."""
    count, oldest = conn.execute(select(func.count(), func.min(e.id)).where(
        e.seal.is_(None), e.at < moment)).one()
    return int(count), None if oldest is None else int(oldest)


def stray_seal_numbers(conn: Connection) -> list[int]:
    """Seal numbers events carry with no seal row (a seal deleted, or an event forged)."""
    query = (select(e.seal).distinct().where(e.seal.is_not(None))
             .where(~select(s.number).where(s.number == e.seal).exists()))
    return sorted(int(n) for n in conn.execute(query).scalars())


# --- internals --------------------------------------------------------------------------------


def _stamp(conn: Connection, number: int, pending: Pending) -> int:
    """Stamp ``pending``'s events still unsealed with seal ``number`` and their own hashes;
    how many it stamped."""
    if conn.dialect.name == "postgresql":
        params: dict[str, Any] = {"ids": pending.ids, "hashes": pending.digests}
    else:
        params = {"hashes": json.dumps(dict(zip(map(str, pending.ids), pending.digests,
                                                strict=True)))}
    return int(conn.execute(_STAMP[conn.dialect.name], {"seal": number, **params}).rowcount)


def _my_turn(conn: Connection, *, wait: bool) -> bool:
    """One sealer at a time per ledger (a PostgreSQL schema): a transaction-level lock."""
    if conn.dialect.name != "postgresql":
        return True  # SQLite: this write transaction already holds the database's lock
    lock = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
    taken = conn.execute(text(f"SELECT {lock}(:k, hashtext(current_schema()))::text"),
                         {"k": _ADVISORY_CLASS}).scalar_one()
    return str(taken) != "false"  # the waiting form returns void: its turn came


def _hashed_fields(number: int, first_id: int, last_id: int, count: int, batch: str,
                   prev_hash: str, sealed_at: datetime, money: Money | None) -> dict[str, Any]:
    fields = {"seal": number, "firstId": int(first_id), "lastId": int(last_id),
              "count": count, "batchHash": batch, "prevHash": prev_hash,
              "sealedAt": utc_text(sealed_at)}
    return fields if money is None else {**fields, "money": money.claim()}


def _seal_hash(fields: Mapping[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _signature_problem(seal: Seal, keys: Mapping[str, VerificationKey]) -> str | None:
    key = keys.get(seal.kid)
    if key is None:
        return f"signed by key {seal.kid!r}, which the key ring does not hold"
    try:
        header = jwt.get_unverified_header(seal.jws)
        claims = jwt.decode(seal.jws, key.key, algorithms=[key.alg])
    except jwt.PyJWTError:
        return "its signature does not verify"
    if header.get("kid") != seal.kid or claims != seal.claims():
        return "its signature covers other fields than the seal's"
    return None
