"""The audit chain's hash never changes form: ledgers store these hashes and must still verify.

``event_hash`` writes the canonical JSON key by key for speed; these tests pin known hashes
and compare it with the definition (``json.dumps`` of the fields, sorted, compact).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from mcpbill_cli.ledger.audit import CHAIN_FIELDS, GENESIS, event_hash


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
