"""The audit trail as JSON lines, for time-series stores and SIEMs: ``mcpbill events export``.

One event per line, streamed (the trail is never loaded whole): the sealed events in seal
order (ids ascending within a seal), then those not sealed yet, in id order. Resume with
``--after`` the ``cursor`` of the last export: the last sealed event written. Ids are taken
before commit (PostgreSQL), so an event may commit after higher ids were shipped; a sealer
takes it in a later seal, which a resumed export reads, so nothing is skipped. An unsealed
event is written again once sealed: ship only the sealed lines, or drop ids already shipped.
Schema
version 2 (version 1, before schema 0005 sealed the trail, had ``seq`` and ``prev_hash`` where
it now has ``id``, ``seal`` and ``hash``); fields may be added in a later version, none is
renamed or removed within one:

=================  ===========================================================================
``schema_version`` ``2``
``id``             integer, the event's id
``at``             string, UTC, ``2026-11-27T12:00:00.123456Z`` (microseconds, always ``Z``)
``kind``           string: ``charge``, ``hold``, ``capture``, ``void``, ``expire``, ``refusal``,
                   ``deposit``, ``issue``, ``revoke``, ...
``code``           string or null: the refusal's error code (``BUDGET_EXCEEDED``, ...)
``tenant``         string or null
``agent``          string or null
``jti``            string or null: the credit token
``token_hash``     string or null: sha256 of a token that could not be parsed (never the token)
``tool``           string or null
``amount_usd``     string or null: USDC as a decimal string, ``"0.01"``
``amount_micro``   integer or null: the same amount in micro-USDC, for summing
``ref``            string or null: the call (receipt id), deposit or token the event concerns
``detail``         object or null: e.g. ``{"reason": "expired"}`` for a refusal
``demo``           boolean: recorded in demo mode
``seal``           integer or null: the number of the seal that holds the event (``mcpbill audit
                   seals export``); null until a sealer takes it (within seconds)
``hash``           string or null: hex sha256 of the event's canonical form, as its seal chains
                   it; null while unsealed
=================  ===========================================================================
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection, and_, or_, select

from mcpbill_cli.clock import rfc3339
from mcpbill_cli.errors import InvalidInput
from mcpbill_cli.fsutil import atomic_writer
from mcpbill_cli.ledger.models import events
from mcpbill_cli.money import format_usd

SCHEMA_VERSION = 2
BATCH = 5000
e = events.c


@dataclass(frozen=True)
class ExportResult:
    """How many events were written, the first and last ``id`` among them, and the cursor:
    the last sealed event written (else the one resumed after), for the next ``--after``."""

    events: int
    first_id: int | None
    last_id: int | None
    cursor: int | None


def export_events(conn: Connection, out: IO[str], *, since: datetime | None = None,
                  until: datetime | None = None, after: int | None = None) -> ExportResult:
    """Write the events with ``since <= at < until`` to ``out``: the sealed ones in seal
    order, then the unsealed ones; with ``after`` (a sealed event's id), only those after it
    in that order; ``after=0`` is the start, as no event has id 0 (a script's first cursor).
    Refuses any other ``after`` that names no sealed event."""
    sealed = select(events).where(e.seal.is_not(None)).order_by(e.seal, e.id)
    unsealed = select(events).where(e.seal.is_(None)).order_by(e.id)
    if after:
        sealed = sealed.where(_after(conn, after))
    count, first, last, cursor = 0, None, None, after
    for query in (sealed, unsealed):
        if since is not None:
            query = query.where(e.at >= since)
        if until is not None:
            query = query.where(e.at < until)
        for row in conn.execute(query.execution_options(yield_per=BATCH)).mappings():
            out.write(event_line(row))
            count += 1
            first = row["id"] if first is None else first
            last = row["id"]
            cursor = row["id"] if row["seal"] is not None else cursor
    return ExportResult(count, first, last, cursor)


def _after(conn: Connection, after: int) -> Any:
    """Where the events after the sealed event ``after`` start: later seals, and later ids
    of its own."""
    seal = conn.execute(select(e.seal).where(e.id == after)).scalar_one_or_none()
    if seal is None:
        raise InvalidInput(f"event {after} is not sealed (or does not exist): resume after the "
                           "export's cursor, the last sealed event it wrote", field="after")
    return or_(e.seal > seal, and_(e.seal == seal, e.id > after))


def event_line(row: Mapping[Any, Any]) -> str:
    """One event in the export schema, as a JSON line (with its newline)."""
    amount = row["amount"]
    document = {
        "schema_version": SCHEMA_VERSION, "id": row["id"], "at": rfc3339(row["at"]),
        "kind": row["kind"], "code": row["code"], "tenant": row["tenant"],
        "agent": row["agent"], "jti": row["jti"], "token_hash": row["token_hash"],
        "tool": row["tool"], "amount_usd": None if amount is None else format_usd(amount),
        "amount_micro": amount, "ref": row["ref"],
        "detail": json.loads(row["detail"]) if row["detail"] else None,
        "demo": bool(row["demo"]), "seal": row["seal"], "hash": row["hash"],
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False) + "\n"


def atomic_text_file(path: Path) -> AbstractContextManager[IO[str]]:
    """Stream into a temp file beside ``path``; renamed over it only when the block succeeds."""
    return atomic_writer(path, text=True)
