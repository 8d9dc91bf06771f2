"""The audit trail: one row per hold, capture, void, refusal and operator action.

Events form a hash chain: each stores ``prev_hash`` and ``hash = sha256(prev_hash +
canonical(event))``, in ``seq`` order. Writers lock the single ``audit_head`` row, so the chain
never forks, and an edited, inserted or deleted event breaks it where reconcile can see.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, func, insert, select, update

from mcpbill_cli.ledger.fastsql import Prepared
from mcpbill_cli.ledger.models import audit_head, events

GENESIS = "0" * 64
CHAIN_FIELDS = ("seq", "at", "kind", "code", "jti", "token_hash", "tenant", "agent", "tool",
                "amount", "ref", "detail", "demo")

_HEAD = Prepared(select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)
                 .with_for_update())
_INSERT = Prepared(insert(events), columns=(*CHAIN_FIELDS, "prev_hash", "hash"))
_MOVE_HEAD = Prepared(update(audit_head).where(audit_head.c.id == 1)
                      .values(seq=bindparam("b_seq"), hash=bindparam("b_hash")))


def event_hash(prev_hash: str, event: Mapping[str, Any]) -> str:
    """The chain hash of one event; stable across SQLite and PostgreSQL round trips.

    ``sha256(prev_hash + canonical)``, where canonical is ``json.dumps`` of the CHAIN_FIELDS
    (``sort_keys=True, separators=(",", ":")``) with ``at`` as UTC ISO 8601 text to the
    microsecond and ``demo`` a boolean. Ledgers store these hashes: this form never changes.
    """
    return chain_hash(prev_hash, event.get("seq"), utc_text(event["at"]),
                      *(event.get(name) for name in CHAIN_FIELDS[2:]))


def utc_text(at: datetime) -> str:
    """``at`` in UTC as ISO 8601 text to the microsecond (naive: it is UTC already)."""
    if at.tzinfo is None:  # as SQLite hands it back: skip making it aware, then converting
        return at.isoformat(timespec="microseconds") + "+00:00"
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def chain_hash(prev_hash: str, seq: Any, at: str, kind: Any, code: Any, jti: Any,
               token_hash: Any, tenant: Any, agent: Any, tool: Any, amount: Any, ref: Any,
               detail: Any, demo: Any) -> str:
    """:func:`event_hash` of the fields in CHAIN_FIELDS order, ``at`` already UTC text: the
    canonical JSON written key by key (sorted), as ``json.dumps`` writes it, without building
    a dict and an encoder per event (re-hashing a day's chain does this a million times)."""
    canonical = _CANONICAL % (
        _json(agent), _json(amount), _json(at), _json(code), "true" if demo else "false",
        _json(detail), _json(jti), _json(kind), _json(ref), _json(seq), _json(tenant),
        _json(token_hash), _json(tool))
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


# The canonical form's keys in sorted order (json.dumps with sort_keys=True).
_CANONICAL = ('{"agent":%s,"amount":%s,"at":%s,"code":%s,"demo":%s,"detail":%s,"jti":%s,'
              '"kind":%s,"ref":%s,"seq":%s,"tenant":%s,"token_hash":%s,"tool":%s}')
_quote = json.encoder.encode_basestring_ascii  # what json.dumps writes a str as


def _json(value: Any) -> str:
    """``value`` exactly as ``json.dumps`` writes it inside the canonical form."""
    if value is None:
        return "null"
    if type(value) is str:
        return _quote(value)
    if type(value) is int:
        return int.__repr__(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def record(conn: Connection, kind: str, *, at: datetime, code: str | None = None,
           jti: str | None = None, tenant: str | None = None, agent: str | None = None,
           tool: str | None = None, amount: int | None = None, ref: str | None = None,
           detail: dict[str, Any] | None = None, demo: bool = False,
           token_hash: str | None = None) -> None:
    """Append one event to the chain, inside the caller's transaction."""
    head = _HEAD.first(conn, {})
    event = {"seq": head.seq + 1, "at": at, "kind": kind, "code": code, "jti": jti,
             "token_hash": token_hash, "tenant": tenant, "agent": agent, "tool": tool,
             "amount": amount, "ref": ref,
             "detail": json.dumps(detail, sort_keys=True) if detail else None, "demo": demo}
    digest = event_hash(head.hash, event)
    _INSERT.rowcount(conn, {**event, "prev_hash": head.hash, "hash": digest})
    _MOVE_HEAD.rowcount(conn, {"b_seq": event["seq"], "b_hash": digest})


@dataclass(frozen=True)
class ChainBreak:
    seq: int
    problem: str


def verify_chain(conn: Connection, *, batch: int = 5000) -> Iterator[ChainBreak]:
    """Walk the chain in ``seq`` order, streaming; yield every place it does not hold."""
    last = conn.execute(select(func.max(events.c.seq))).scalar_one() or 0
    expected_seq, expected_prev = yield from verify_events(conn, 1, last, (1, GENESIS),
                                                           batch=batch)
    head = conn.execute(select(audit_head.c.seq, audit_head.c.hash)).one()
    if head.seq != expected_seq - 1 or head.hash != expected_prev:
        yield ChainBreak(head.seq, "the chain's end does not match audit_head (events deleted "
                                   "from the end, or the head was edited)")


def verify_events(conn: Connection, first: int, last: int, expected: tuple[int, str], *,
                  batch: int = 5000) -> Generator[ChainBreak, None, tuple[int, str]]:
    """Re-hash the events with ``seq`` in ``[first, last]`` in order, streaming; the first
    must be ``expected`` (its ``seq``, its ``prev_hash``). Yields every break; returns what
    the event after ``last`` must be."""
    expected_seq, expected_prev = expected
    at_of, demo_of = (_converter(conn, name) for name in ("at", "demo"))
    for (seq, at, kind, code, jti, token_hash, tenant, agent, tool, amount, ref, detail, demo,
         prev_hash, digest) in _event_rows(conn, first, last, batch):
        if seq != expected_seq:
            yield ChainBreak(expected_seq, f"events {expected_seq}..{seq - 1} are missing")
        if prev_hash != expected_prev:
            yield ChainBreak(seq, "prev_hash does not match the event before")
        if chain_hash(prev_hash, seq, utc_text(at_of(at)), kind, code, jti, token_hash, tenant,
                      agent, tool, amount, ref, detail, demo_of(demo)) != digest:
            yield ChainBreak(seq, "the event was changed after it was written")
        expected_prev, expected_seq = digest, seq + 1
    return expected_seq, expected_prev


def _event_rows(conn: Connection, first: int, last: int, batch: int) -> Iterator[Any]:
    """The events' CHAIN_FIELDS, prev_hash and hash as the driver's own tuples (a server-side
    cursor on PostgreSQL): a fraction of the cost of SQLAlchemy rows, a million times a day."""
    postgres = conn.dialect.name == "postgresql"
    mark = "%({})s" if postgres else ":{}"
    sql = (f"SELECT {', '.join((*CHAIN_FIELDS, 'prev_hash', 'hash'))} FROM events "  # noqa: S608 - constants only
           f"WHERE seq >= {mark.format('first')} AND seq <= {mark.format('last')} ORDER BY seq")
    driver: Any = conn.connection.driver_connection
    cursor = driver.cursor("mcpbill_audit_chain") if postgres else driver.cursor()
    try:
        cursor.execute(sql, {"first": first, "last": last})
        while rows := cursor.fetchmany(batch):
            yield from rows
    finally:
        cursor.close()


def _converter(conn: Connection, column: str) -> Callable[[Any], Any]:
    """What SQLAlchemy does to a driver's value of ``events.column`` (SQLite: parse the
    datetime text, 0/1 to bool), so the hash sees what it saw when the event was written."""
    kind = events.c[column].type.dialect_impl(conn.dialect)
    process = kind.result_processor(conn.dialect, None)
    return process if process is not None else _unchanged


def _unchanged(value: Any) -> Any:
    return value


def token_fingerprint(token: object) -> str:
    """What the trail keeps of a token it could not parse: a hash, never the token.

    Total, as a refusal's audit must be: a str hashes its UTF-8 (a lone surrogate as
    written), bytes as they are, and any other value its type's name.
    """
    if isinstance(token, str):
        data = token.encode("utf-8", "surrogatepass")
    elif isinstance(token, bytes | bytearray):
        data = bytes(token)
    else:
        data = type(token).__name__.encode()
    return hashlib.sha256(data).hexdigest()
