"""The audit trail: one row per hold, capture, void, refusal and operator action.

Events form a hash chain: each stores ``prev_hash`` and ``hash = sha256(prev_hash +
canonical(event))``, in ``seq`` order. Writers lock the single ``audit_head`` row, so the chain
never forks, and an edited, inserted or deleted event breaks it where reconcile can see.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from mcpbill_cli.clock import aware
from mcpbill_cli.ledger.models import audit_head, events

GENESIS = "0" * 64
CHAIN_FIELDS = ("seq", "at", "kind", "code", "jti", "token_hash", "tenant", "agent", "tool",
                "amount", "ref", "detail", "demo")

_HEAD = select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1).with_for_update()
_INSERT = insert(events)
_MOVE_HEAD = update(audit_head).where(audit_head.c.id == 1)


def event_hash(prev_hash: str, event: Mapping[str, Any]) -> str:
    """The chain hash of one event; stable across SQLite and PostgreSQL round trips."""
    fields = {name: event.get(name) for name in CHAIN_FIELDS}
    fields["at"] = aware(event["at"]).astimezone(UTC).isoformat(timespec="microseconds")
    fields["demo"] = bool(fields["demo"])
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


def record(conn: Connection, kind: str, *, at: datetime, code: str | None = None,
           jti: str | None = None, tenant: str | None = None, agent: str | None = None,
           tool: str | None = None, amount: int | None = None, ref: str | None = None,
           detail: dict[str, Any] | None = None, demo: bool = False,
           token_hash: str | None = None) -> None:
    """Append one event to the chain, inside the caller's transaction."""
    head = conn.execute(_HEAD).one()
    event = {"seq": head.seq + 1, "at": at, "kind": kind, "code": code, "jti": jti,
             "token_hash": token_hash, "tenant": tenant, "agent": agent, "tool": tool,
             "amount": amount, "ref": ref,
             "detail": json.dumps(detail, sort_keys=True) if detail else None, "demo": demo}
    digest = event_hash(head.hash, event)
    conn.execute(_INSERT, {**event, "prev_hash": head.hash, "hash": digest})
    conn.execute(_MOVE_HEAD, {"seq": event["seq"], "hash": digest})


@dataclass(frozen=True)
class ChainBreak:
    seq: int
    problem: str


def verify_chain(conn: Connection, *, batch: int = 5000) -> Iterator[ChainBreak]:
    """Walk the chain in ``seq`` order, streaming; yield every place it does not hold."""
    expected_prev, expected_seq = GENESIS, 1
    query = select(events).order_by(events.c.seq).execution_options(yield_per=batch)
    for row in conn.execute(query).mappings():
        if row["seq"] != expected_seq:
            yield ChainBreak(expected_seq, f"events {expected_seq}..{row['seq'] - 1} are missing")
        if row["prev_hash"] != expected_prev:
            yield ChainBreak(row["seq"], "prev_hash does not match the event before")
        if event_hash(row["prev_hash"], dict(row)) != row["hash"]:
            yield ChainBreak(row["seq"], "the event was changed after it was written")
        expected_prev, expected_seq = row["hash"], row["seq"] + 1
    head = conn.execute(select(audit_head.c.seq, audit_head.c.hash)).one()
    if head.seq != expected_seq - 1 or head.hash != expected_prev:
        yield ChainBreak(head.seq, "the chain's end does not match audit_head (events deleted "
                                   "from the end, or the head was edited)")


def token_fingerprint(token: str) -> str:
    """What the trail keeps of a token it could not parse: a hash, never the token."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
