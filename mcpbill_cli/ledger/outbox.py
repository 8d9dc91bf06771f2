"""Alert events and their webhook deliveries, kept in the ledger (the outbox).

:func:`emit` writes an event inside the caller's transaction, with one delivery row per
enabled endpoint that listens to its type: an event exists exactly when what caused it
committed, and a crash loses none. Deliverers (:mod:`mcpbill_cli.webhooks`) send the rows later,
never on the caller's path. A delivery is claimed with one guarded UPDATE (its lease past, a
claim token of the deliverer's own), so any number of deliverers on one ledger never send one
event to one endpoint at the same time; what a deliverer killed mid-send held comes due again
when its lease ends (at least once).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, insert, or_, select, update

from mcpbill_cli.clock import aware, rfc3339
from mcpbill_cli.ledger import ops
from mcpbill_cli.ledger.models import webhook_deliveries, webhook_endpoints, webhook_events

e = webhook_events.c
ep = webhook_endpoints.c
dl = webhook_deliveries.c

# The event types an endpoint can listen to ("*": all of them).
EVENT_TYPES = (
    "token.threshold",  # a token's use (spent and held) crossed 80% or 100% of its limit
    "tenant.balance_low",  # a tenant's available balance fell under its alert amount
    "cap.reached",  # a spending cap refused a call (once per tenant, window and period)
    "refund.created",  # a call was refunded, in full or in part
    "reconcile.findings",  # a reconcile found something wrong
    "webhook.test",  # `mcpbill webhooks test`: to one endpoint only
)
ALL_TYPES = "*"


def new_event_id() -> str:
    """An event id that sorts by time."""
    return f"evt_{time.time_ns():016x}{secrets.token_hex(6)}"


def stable_event_id(*parts: str) -> str:
    """The id of an event that must happen once for ``parts`` (a cap reached per tenant, window
    and period): a second :func:`emit` under it writes nothing."""
    return "evt_" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:28]


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class Endpoint:
    """An endpoint as the operator sees it: never its secret."""

    id: str
    url: str
    event_types: list[str]
    enabled: bool
    created_at: datetime


@dataclass(frozen=True)
class Delivery:
    event_id: str
    endpoint_id: str
    type: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    delivered_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class Job:
    """A claimed delivery: what to send where, and the secret to sign it with."""

    event_id: str
    endpoint_id: str
    url: str
    secret: str
    payload: str
    attempts: int
    claim: str


def emit(conn: Connection, type: str, data: dict[str, Any], *, at: datetime,
         event_id: str | None = None, endpoint_id: str | None = None) -> str | None:
    """Write an event of ``type`` (one of :data:`EVENT_TYPES`) and its deliveries, inside the
    caller's transaction; returns its id, or None when ``event_id`` was emitted already.

    ``data`` is JSON-ready (snake_case, amounts as ``*_usd`` strings); the body sent is
    ``{"type", "timestamp", "data"}``. ``endpoint_id`` sends it to that endpoint only.
    """
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")
    event_id = event_id or new_event_id()
    payload = json.dumps({"type": type, "timestamp": rfc3339(at), "data": data},
                         separators=(",", ":"), sort_keys=True)
    if not ops.insert_ignore(conn, webhook_events, {"id": event_id, "type": type,
                                                    "payload": payload, "created_at": at}):
        return None
    rows = [{"event_id": event_id, "endpoint_id": endpoint, "status": "pending", "attempts": 0,
             "next_attempt_at": at}
            for endpoint in _listening(conn, type, endpoint_id)]
    if rows:
        conn.execute(insert(webhook_deliveries), rows)
    return event_id


def _listening(conn: Connection, type: str, endpoint_id: str | None) -> list[str]:
    query = select(ep.id, ep.event_types).where(ep.enabled.is_(True))
    if endpoint_id is not None:
        query = query.where(ep.id == endpoint_id)
    return [row.id for row in conn.execute(query)
            if endpoint_id is not None or _listens(json.loads(row.event_types), type)]


def _listens(event_types: list[str], type: str) -> bool:
    return ALL_TYPES in event_types or type in event_types


# --- endpoints -----------------------------------------------------------------------------------


def add_endpoint(conn: Connection, url: str, event_types: list[str], *, at: datetime
                 ) -> tuple[Endpoint, str]:
    """A new enabled endpoint and its secret (the one time it is handed out)."""
    endpoint = Endpoint(f"whep_{secrets.token_hex(8)}", url, event_types, True, at)
    secret = new_secret()
    conn.execute(insert(webhook_endpoints).values(
        id=endpoint.id, url=url, event_types=json.dumps(event_types), secret=secret,
        enabled=True, created_at=at))
    return endpoint, secret


def endpoints(conn: Connection) -> list[Endpoint]:
    rows = conn.execute(select(ep.id, ep.url, ep.event_types, ep.enabled, ep.created_at)
                        .order_by(ep.created_at, ep.id))
    return [_endpoint(row) for row in rows]


def endpoint(conn: Connection, endpoint_id: str) -> Endpoint | None:
    row = conn.execute(select(ep.id, ep.url, ep.event_types, ep.enabled, ep.created_at)
                       .where(ep.id == endpoint_id)).first()
    return None if row is None else _endpoint(row)


def remove_endpoint(conn: Connection, endpoint_id: str) -> int | None:
    """Delete an endpoint and its deliveries; how many were still pending, None if unknown."""
    pending = conn.execute(select(dl.event_id).where(
        dl.endpoint_id == endpoint_id, dl.status == "pending")).all()
    if conn.execute(delete(webhook_endpoints).where(ep.id == endpoint_id)).rowcount != 1:
        return None
    conn.execute(delete(webhook_deliveries).where(dl.endpoint_id == endpoint_id))
    return len(pending)


def _endpoint(row: Any) -> Endpoint:
    return Endpoint(row.id, row.url, json.loads(row.event_types), bool(row.enabled),
                    aware(row.created_at))


# --- deliveries ----------------------------------------------------------------------------------


def due(conn: Connection, *, now: datetime, limit: int,
        event_id: str | None = None) -> list[tuple[str, str]]:
    """(event id, endpoint id) of pending deliveries whose time has come and whose lease (if
    any) has ended, oldest first."""
    query = (select(dl.event_id, dl.endpoint_id)
             .where(dl.status == "pending", dl.next_attempt_at <= now,
                    or_(dl.claimed_until.is_(None), dl.claimed_until <= now))
             .order_by(dl.next_attempt_at, dl.event_id).limit(limit))
    if event_id is not None:
        query = query.where(dl.event_id == event_id)
    return [(row.event_id, row.endpoint_id) for row in conn.execute(query)]


def claim(conn: Connection, event_id: str, endpoint_id: str, *, now: datetime,
          lease: timedelta) -> Job | None:
    """Take one due delivery for ``lease``: the guarded UPDATE lets one deliverer win; None
    when another has it, or it was delivered or became not due meanwhile."""
    token = secrets.token_hex(12)
    won = conn.execute(
        update(webhook_deliveries)
        .where(dl.event_id == event_id, dl.endpoint_id == endpoint_id, dl.status == "pending",
               dl.next_attempt_at <= now,
               or_(dl.claimed_until.is_(None), dl.claimed_until <= now))
        .values(claim=token, claimed_until=now + lease, attempts=dl.attempts + 1)).rowcount
    if won != 1:
        return None
    row = conn.execute(
        select(ep.url, ep.secret, e.payload, dl.attempts)
        .select_from(webhook_deliveries.join(webhook_events, e.id == dl.event_id)
                     .join(webhook_endpoints, ep.id == dl.endpoint_id))
        .where(dl.event_id == event_id, dl.endpoint_id == endpoint_id)).first()
    if row is None:  # the endpoint was removed meanwhile
        return None
    return Job(event_id, endpoint_id, row.url, row.secret, row.payload, int(row.attempts),
               token)


def delivered(conn: Connection, job: Job, *, status: int, at: datetime) -> bool:
    """Mark a claimed delivery done; False when the claim was lost (its lease ended and
    another deliverer took it)."""
    return _finish(conn, job, status="delivered", last_status=status, last_error=None,
                   next_attempt_at=None, delivered_at=at)


def attempt_failed(conn: Connection, job: Job, *, status: int | None, error: str,
                   retry_at: datetime | None) -> bool:
    """Record a failed attempt: due again at ``retry_at``, or ``failed`` for good (None)."""
    return _finish(conn, job, status="pending" if retry_at else "failed", last_status=status,
                   last_error=error[:500], next_attempt_at=retry_at, delivered_at=None)


def _finish(conn: Connection, job: Job, *, status: str, last_status: int | None,
            last_error: str | None, next_attempt_at: datetime | None,
            delivered_at: datetime | None) -> bool:
    values: dict[str, Any] = {"status": status, "last_status": last_status,
                              "last_error": last_error, "claim": None, "claimed_until": None,
                              "delivered_at": delivered_at}
    if next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
    return conn.execute(update(webhook_deliveries).where(
        dl.event_id == job.event_id, dl.endpoint_id == job.endpoint_id,
        dl.claim == job.claim).values(values)).rowcount == 1


def deliveries(conn: Connection, *, endpoint_id: str | None = None, limit: int = 100
               ) -> list[Delivery]:
    """The newest deliveries first, of one endpoint or of all."""
    query = (select(dl.event_id, dl.endpoint_id, e.type, dl.status, dl.attempts,
                    dl.next_attempt_at, dl.last_status, dl.last_error, dl.delivered_at,
                    e.created_at)
             .select_from(webhook_deliveries.join(webhook_events, e.id == dl.event_id))
             .order_by(e.created_at.desc(), dl.event_id.desc()).limit(limit))
    if endpoint_id is not None:
        query = query.where(dl.endpoint_id == endpoint_id)
    return [Delivery(row.event_id, row.endpoint_id, row.type, row.status, int(row.attempts),
                     None if row.status != "pending" else aware(row.next_attempt_at),
                     row.last_status, row.last_error,
                     None if row.delivered_at is None else aware(row.delivered_at),
                     aware(row.created_at)) for row in conn.execute(query)]
