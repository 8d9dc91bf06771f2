"""The audit trail: one row per hold, capture, void, refusal and operator action.

Writers append events inside their own transactions and take no shared lock: an event's id
is all that orders it. A sealer (:mod:`mcpbill_cli.ledger.seals`) later chains the committed
events in signed batches, writing each event's own hash, :func:`event_digest`, as it seals it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert

from mcpbill_cli.ledger.fastsql import Prepared
from mcpbill_cli.ledger.models import events

GENESIS = "0" * 64
# The fields an event's hash covers, in the order chain_hash takes them. ``seq`` is the
# event's position: its id (ledgers of schema 0002-0004 numbered a global chain with it).
CHAIN_FIELDS = ("seq", "at", "kind", "code", "jti", "token_hash", "tenant", "agent", "tool",
                "amount", "ref", "detail", "demo")
EVENT_FIELDS = CHAIN_FIELDS[1:]

_INSERT = Prepared(insert(events), columns=EVENT_FIELDS)


def event_digest(event: Mapping[str, Any]) -> str:
    """An event's own hash, as a sealer writes it: :func:`event_hash` with the event's id as
    its ``seq`` and no previous hash. Seals chain these; this form never changes."""
    return event_hash("", {**event, "seq": event["id"]})


def row_digest(row: Sequence[Any]) -> str:
    """:func:`event_digest` of an event read as a row of its ``id`` then its EVENT_FIELDS, in
    that order: no mapping built per event (a sealer hashes every event it seals)."""
    return chain_hash("", row[0], utc_text(row[1]), *row[2:])


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
    q, s, j = _quote, str, _json  # inline for text and None (a call per field is half the cost)
    canonical = _CANONICAL % (
        q(agent) if type(agent) is s else "null" if agent is None else j(agent),
        j(amount), q(at) if type(at) is s else j(at),
        q(code) if type(code) is s else "null" if code is None else j(code),
        "true" if demo else "false",
        q(detail) if type(detail) is s else "null" if detail is None else j(detail),
        q(jti) if type(jti) is s else "null" if jti is None else j(jti),
        q(kind) if type(kind) is s else j(kind),
        q(ref) if type(ref) is s else "null" if ref is None else j(ref), j(seq),
        q(tenant) if type(tenant) is s else "null" if tenant is None else j(tenant),
        q(token_hash) if type(token_hash) is s else "null" if token_hash is None
        else j(token_hash),
        q(tool) if type(tool) is s else "null" if tool is None else j(tool))
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
    """Append one event, inside the caller's transaction; nothing shared is locked."""
    _INSERT.rowcount(conn, {
        "at": at, "kind": kind, "code": code, "jti": jti, "token_hash": token_hash,
        "tenant": tenant, "agent": agent, "tool": tool, "amount": amount, "ref": ref,
        "detail": json.dumps(detail, sort_keys=True) if detail else None, "demo": demo})


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
