"""PostgreSQL re-hashing the chain (``chain_sql``) finds exactly what ``audit.verify_events``
finds, on events whose text JSON escapes, whose times are odd, and on tampered chains."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, insert, text

from mcpbill_cli.ledger import audit
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import events
from mcpbill_cli.reconcile import chain_sql

AT = datetime(2031, 3, 14, 12, 0, tzinfo=UTC)
ODD_TEXT = ["plain", "q\"uote", "back\\slash", "new\nline", "tab\t", "del\x7f", "café",
            "\U0001f600", "", " ", "{\"reason\": \"expired\"}", "a/b", "~"]
ODD_AT = [AT, datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
          datetime(1000, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
          datetime(2031, 3, 14, 23, 0, tzinfo=timezone(timedelta(hours=-5))),
          datetime(2031, 3, 14, 0, 0, 0, 1, tzinfo=UTC)]


def odd_events() -> list[dict[str, Any]]:
    found = []
    for n, value in enumerate(ODD_TEXT * 2):
        found.append({"at": ODD_AT[n % len(ODD_AT)], "kind": "charge" if n % 3 else value,
                      "code": value if n % 2 else None, "jti": f"tok_{n}", "token_hash": None,
                      "tenant": value, "agent": None if n % 4 else value, "tool": "search",
                      "amount": [None, 0, -5, 2**62][n % 4], "ref": value,
                      "detail": json.dumps({"v": value}) if n % 5 == 0 else None,
                      "demo": n % 2 == 0})
    return found


def write_chain(engine: Engine, rows: list[dict[str, Any]],
                hashing: Callable[[str, dict[str, Any]], str] = audit.event_hash) -> None:
    prev = audit.GENESIS
    with engine.begin() as conn:
        for seq, row in enumerate(rows, start=1):
            event = {**row, "seq": seq}
            digest = hashing(prev, event)
            conn.execute(insert(events).values(**event, prev_hash=prev, hash=digest))
            prev = digest


def compare(engine: Engine, first: int, last: int) -> list[tuple[int, str]]:
    with reading(engine) as conn:
        expected = (first, audit.GENESIS) if first == 1 else conn.execute(text(
            "SELECT seq + 1, hash FROM events WHERE seq < :f ORDER BY seq DESC LIMIT 1"),
            {"f": first}).one()
        python = [(b.seq, b.problem) for b in
                  audit.verify_events(conn, first, last, tuple(expected))]
        server = [(b.seq, b.problem) for b in
                  chain_sql.verify_segment(conn, first, last, tuple(expected))]
    assert server == python
    return server


@pytest.fixture
def postgres(pg_engine: Engine) -> Engine:
    """chain_sql is PostgreSQL's."""
    return pg_engine


def test_odd_events_verify_in_the_server_as_in_python(postgres: Engine) -> None:
    write_chain(postgres, odd_events())
    assert compare(postgres, 1, 26) == []
    assert compare(postgres, 7, 20) == []


TAMPERING = [
    "UPDATE events SET amount = 1 WHERE seq = 3",
    "UPDATE events SET tenant = 'caf\u00e9' WHERE seq = 4",
    "UPDATE events SET at = at + interval '1 microsecond' WHERE seq = 5",
    "UPDATE events SET demo = NOT demo WHERE seq = 6",
    "DELETE FROM events WHERE seq IN (8, 9)",
    "UPDATE events SET prev_hash = (SELECT hash FROM events WHERE seq = 2) WHERE seq = 12",
    "UPDATE events SET seq = 40 WHERE seq = 26",
]


@pytest.mark.parametrize("tampering", TAMPERING)
def test_tampering_is_found_alike(postgres: Engine, tampering: str) -> None:
    write_chain(postgres, odd_events())
    with postgres.begin() as conn:
        conn.execute(text(tampering))
    assert compare(postgres, 1, 40)
    compare(postgres, 5, 13)


def sql_style_hash(prev_hash: str, event: dict[str, Any]) -> str:
    """A forger's hash: the canonical form with text left unescaped (what the server would
    compute if it did not check that the text is printable ASCII)."""
    fields = {name: event.get(name) for name in audit.CHAIN_FIELDS}
    fields["at"] = event["at"].astimezone(UTC).isoformat(timespec="microseconds")
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev_hash + canonical.replace("\\n", "\n")).encode()).hexdigest()


def test_a_hash_forged_over_unescaped_text_is_not_vouched_for(postgres: Engine) -> None:
    plain = {**odd_events()[1], "at": AT}
    write_chain(postgres, [{**plain, "detail": "line\nbreak"}, {**plain, "tenant": "café"}],
                hashing=sql_style_hash)
    assert compare(postgres, 1, 2) == [(1, "the event was changed after it was written"),
                                       (2, "the event was changed after it was written")]


def test_a_clean_plain_chain_never_leaves_the_server(postgres: Engine) -> None:
    plain = [{**event, "kind": "charge", "code": None, "tenant": "acme", "ref": "rcpt_1",
              "agent": "a-1", "at": AT} for event in odd_events()]
    write_chain(postgres, plain)
    with reading(postgres) as conn:
        assert [row[0] for row in chain_sql._suspects(conn, 1, 26)] == [1]  # the first: linked
        assert [row[0] for row in chain_sql._suspects(conn, 5, 26)] == [5]  # by the caller
