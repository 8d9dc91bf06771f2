"""An event's hash never changes form: ledgers store these hashes and must still verify.

``event_digest`` (an event's own hash, which seals chain) is ``event_hash`` with the event's id
as ``seq`` and no previous hash; ``event_hash`` (which schemas 0002-0004 chained, and the 0005
upgrade verifies) writes the canonical JSON key by key for speed. These tests pin known hashes,
compare both with the definition (``json.dumps`` of the fields, sorted, compact), and check
that an event read back from SQLite or PostgreSQL hashes as it did before it was written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from mcpbill_cli.clock import utcnow
from mcpbill_cli.keys import init_keyring
from mcpbill_cli.ledger import audit
from mcpbill_cli.ledger.audit import CHAIN_FIELDS, GENESIS, event_digest, event_hash
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import events as events_table
from mcpbill_cli.ledger.sealing import seal_all
from mcpbill_cli.ledger.seals import signer


def defined_hash(prev_hash: str, event: Mapping[str, Any]) -> str:
    """The hash as first written (mcpbill 0002): the definition the fast form must match."""
    fields = {name: event.get(name) for name in CHAIN_FIELDS}
    at = event["at"] if event["at"].tzinfo is not None else event["at"].replace(tzinfo=UTC)
    fields["at"] = at.astimezone(UTC).isoformat(timespec="microseconds")
    fields["demo"] = bool(fields["demo"])
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


PINNED = [
    (GENESIS, {"seq": 1, "at": datetime(2026, 11, 27, 0, 0, 1, tzinfo=UTC), "kind": "deposit",
               "tenant": "tenant-0", "amount": 1882483520, "ref": "deposit:demo:tenant-0",
               "demo": True},
     "ea0fe15ef9a8da4660634eddd45a2e5f707586bdc182f2caa96da740f1ca5333"),
    ("ea0fe15ef9a8da4660634eddd45a2e5f707586bdc182f2caa96da740f1ca5333",
     {"seq": 2, "at": datetime(2026, 11, 27, 9, 30, 0, 123456), "kind": "refusal",
      "code": "INVALID_CREDIT_TOKEN", "jti": "tok_1", "tenant": "acme", "agent": "a/1",
      "tool": "search", "detail": json.dumps({"reason": "expired"}), "demo": 0},
     "d1a712f020ba53532f58b59d07a7de5d68487206e816377b8d190194cb2800da"),
    ("f" * 64, {"seq": 3, "at": datetime(2026, 11, 27, 12, 0, tzinfo=timezone(timedelta(hours=-5))),
                "kind": "charge", "jti": "tok_\u00e9\U0001f600", "tenant": "t\"q\\\n\x7f",
                "agent": None, "tool": "db.[x]", "amount": 0, "token_hash": "ab" * 32,
                "demo": False},
     "4252c4467f9e42fc52c0c5ba02b87dce5183cb975aa3bed4d4a4d2d932d09ec9"),
    ("a" * 64, {"seq": True, "at": datetime(2026, 1, 1), "kind": 1.5,
                "code": ["x", {"b": 1, "a": 2}], "amount": float("nan"), "demo": "yes"},
     "da07312acd93d5f3e8d4b400e729db6c8814ad0a6f583cf44ca7e3e96fc68f2b"),
]


def test_known_hashes_still_come_out() -> None:
    for prev_hash, event, expected in PINNED:
        assert event_hash(prev_hash, event) == expected
        assert defined_hash(prev_hash, event) == expected


texts = st.none() | st.text(max_size=40)
moments = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                       timezones=st.none() | st.timezones())
events = st.fixed_dictionaries({
    "seq": st.integers(min_value=-2**63, max_value=2**63), "at": moments,
    "kind": texts, "code": texts, "jti": texts, "token_hash": texts, "tenant": texts,
    "agent": texts, "tool": texts, "ref": texts, "detail": texts,
    "amount": st.none() | st.integers() | st.booleans() | st.floats(),
    "demo": st.none() | st.booleans() | st.integers(0, 2),
})


@given(st.text(min_size=64, max_size=64), events)
def test_the_fast_form_is_the_definition(prev_hash: str, event: dict[str, Any]) -> None:
    assert event_hash(prev_hash, event) == defined_hash(prev_hash, event)


def defined_digest(event: Mapping[str, Any]) -> str:
    return defined_hash("", {**event, "seq": event["id"]})


PINNED_DIGESTS = [
    ({"id": 1, "at": datetime(2026, 11, 27, 0, 0, 1, tzinfo=UTC), "kind": "deposit",
      "tenant": "tenant-0", "amount": 1882483520, "ref": "deposit:demo:tenant-0", "demo": True},
     "d436909343c0478fb962e5784fb06e9ae23e0400a5b9fb73cdb8c584cf046f36"),
    ({"id": 2, "at": datetime(2026, 11, 27, 9, 30, 0, 123456), "kind": "refusal",
      "code": "INVALID_CREDIT_TOKEN", "jti": "tok_1", "tenant": "acme", "agent": "a/1",
      "tool": "search", "detail": json.dumps({"reason": "expired"}), "demo": 0},
     "ac932d9f7c24b0d1ed4b6ee9096d5ac2b273685e459c9942779c0ef5397d61e9"),
    ({"id": 2**62, "at": datetime(2026, 11, 27, 12, 0, tzinfo=timezone(timedelta(hours=-5))),
      "kind": "charge", "jti": "tok_\u00e9\U0001f600", "tenant": "t\"q\\\n\x7f", "agent": None,
      "tool": "db.[x]", "amount": 0, "token_hash": "ab" * 32, "demo": False},
     "87be65f040f4c98d424c0fd69b418a95141a4242463bbec9947f5d3ccbf215e5"),
]


def test_known_event_digests_still_come_out() -> None:
    for event, expected in PINNED_DIGESTS:
        assert event_digest(event) == expected
        assert defined_digest(event) == expected


@given(st.integers(min_value=1, max_value=2**63 - 1), events)
def test_the_digest_is_the_definition_with_the_id_as_its_place(event_id: int,
                                                               event: dict[str, Any]) -> None:
    assert event_digest({**event, "id": event_id}) == defined_digest({**event, "id": event_id})


ODD = [
    # UTC, as the ledger's clock gives it (SQLite keeps an aware time's wall clock, not its
    # offset: another zone would be read back as that wall clock in UTC).
    {"at": datetime(2026, 11, 27, 23, 59, 59, 999999, tzinfo=UTC),
     "code": "q\"uote", "jti": "tok_\u00e9", "tenant": "t\"q\\\n\x7f", "agent": "\U0001f600",
     "tool": "db.[x]", "amount": 2**62, "ref": "", "detail": {"reason": "caf\u00e9"},
     "demo": True, "token_hash": "ab" * 32},
    {"at": datetime(2026, 1, 1, tzinfo=UTC), "amount": -5, "demo": False},
    {"at": datetime(2026, 6, 30, 12, 0, 0, 1, tzinfo=UTC), "tool": "tab\there", "amount": None},
]


def test_the_digest_of_an_event_read_back_is_the_digest_it_was_written_with(
        engine: Engine, tmp_path: Path) -> None:
    """On both backends: the values given, the row read back and the hash the sealer stored
    all hash alike."""
    for fields in ODD:
        with writing(engine) as conn:
            audit.record(conn, "charge", **fields)
    info, key = init_keyring(tmp_path / "keys", "EdDSA", now=utcnow(), force=False).signing_key()
    seal_all(engine, signer(info.alg, info.kid, key), clock=utcnow)
    with reading(engine) as conn:
        rows = [dict(row) for row in conn.execute(
            select(events_table).order_by(events_table.c.id)).mappings()]
    given_digests = [event_digest({**{name: None for name in CHAIN_FIELDS}, **fields,
                                   "kind": "charge", "id": row["id"],
                                   "detail": json.dumps(fields["detail"], sort_keys=True)
                                   if fields.get("detail") else None})
                     for fields, row in zip(ODD, rows, strict=True)]
    assert [row["hash"] for row in rows] == [event_digest(row) for row in rows] == given_digests
