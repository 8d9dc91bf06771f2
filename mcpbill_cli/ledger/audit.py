"""The audit trail: one row per hold, capture, void, refusal and operator action."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert

from mcpbill_cli.ledger.models import events

_INSERT = insert(events)


def record(conn: Connection, kind: str, *, at: datetime, code: str | None = None,
           jti: str | None = None, tenant: str | None = None, agent: str | None = None,
           tool: str | None = None, amount: int | None = None, ref: str | None = None,
           detail: dict[str, Any] | None = None, demo: bool = False,
           token_hash: str | None = None) -> None:
    conn.execute(_INSERT, {
        "at": at, "kind": kind, "code": code, "jti": jti, "token_hash": token_hash,
        "tenant": tenant, "agent": agent, "tool": tool, "amount": amount, "ref": ref,
        "detail": json.dumps(detail, sort_keys=True) if detail else None, "demo": demo,
    })


def token_fingerprint(token: str) -> str:
    """What the trail keeps of a token it could not parse: a hash, never the token."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
