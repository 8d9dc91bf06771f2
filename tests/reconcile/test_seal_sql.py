"""PostgreSQL hashing the sealed batches (``seal_sql``) finds exactly what Python's
``seals.verify_batch`` finds, on events whose text JSON escapes, whose times are odd, and on
tampered batches; a clean batch of plain events never leaves the server."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, text, update

from mcpbill_cli.ledger import audit
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import events, seals
from mcpbill_cli.ledger.seals import batch_hash, read_seals, seal_pending, verify_batch
from mcpbill_cli.reconcile import seal_sql
from mcpbill_cli.reconcile.seal_check import BatchSlice, _check_batches

AT = datetime(2031, 3, 14, 12, 0, tzinfo=UTC)
ODD_TEXT = ["plain", "q\"uote", "back\\slash", "new\nline", "tab\t", "del\x7f", "café",
            "\U0001f600", "", " ", "{\"reason\": \"expired\"}", "a/b", "~"]
ODD_AT = [AT, datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
          datetime(1000, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
          datetime(2031, 3, 14, 23, 0, tzinfo=timezone(timedelta(hours=-5))),
          datetime(2031, 3, 14, 0, 0, 0, 1, tzinfo=UTC)]
PER_SEAL = 6


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


def plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**row, "kind": "charge", "code": None, "tenant": "acme", "ref": "rcpt_1",
             "agent": "a-1", "at": AT, "detail": json.dumps({"n": n})}
            for n, row in enumerate(rows)]


def unsigned(claims: dict[str, Any]) -> tuple[str, str]:
    return "test", "unsigned"  # these tests check batches, not signatures


def write_sealed(engine: Engine, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(insert(events), rows)
    while True:
        with writing(engine) as conn:
            if seal_pending(conn, unsigned, now=AT, limit=PER_SEAL) is None:
                return


def compare(engine: Engine) -> list[tuple[str, str, str]]:
    """What the server-first check finds, which must be what Python alone finds."""
    with reading(engine) as conn:
        numbers = list(conn.execute(select(seals.c.number).order_by(seals.c.number)).scalars())
        python = [(b.table, b.key, b.problem) for seal in read_seals(conn)
                  for b in verify_batch(conn, seal)]
        result = _check_batches(conn, BatchSlice("", numbers[0], numbers[-1], 1000))
    server = [(r.table, r.key, r.detail) for rows in result.rows.values() for r in rows]
    assert server == python
    return server


def unvouched(engine: Engine) -> list[int]:
    with reading(engine) as conn:
        return [seal.number for seal in seal_sql.unvouched(conn, list(read_seals(conn)))]


@pytest.fixture
def postgres(pg_engine: Engine) -> Engine:
    """seal_sql is PostgreSQL's."""
    return pg_engine


def test_the_servers_digest_is_the_event_digest(postgres: Engine) -> None:
    write_sealed(postgres, plain(odd_events()))
    with reading(postgres) as conn:
        rows = conn.execute(text(
            f"SELECT id, encode(sha256(convert_to({seal_sql.canonical_sql()}, 'UTF8')), 'hex') "
            "FROM events ORDER BY id")).all()
        stored = dict(conn.execute(select(events.c.id, events.c.hash)).all())
    assert rows and all(stored[event_id] == digest for event_id, digest in rows)


def test_odd_events_verify_in_the_server_as_in_python(postgres: Engine) -> None:
    write_sealed(postgres, odd_events())
    assert compare(postgres) == []
    assert unvouched(postgres) == [1, 2, 3, 4, 5]  # odd text in every batch: Python decides


def test_a_clean_batch_of_plain_events_never_leaves_the_server(postgres: Engine) -> None:
    write_sealed(postgres, plain(odd_events()))
    assert unvouched(postgres) == []
    assert compare(postgres) == []


TAMPERING = [
    "UPDATE events SET amount = 1 WHERE id = 3",
    "UPDATE events SET tenant = 'caf\u00e9' WHERE id = 4",
    "UPDATE events SET at = at + interval '1 microsecond' WHERE id = 5",
    "UPDATE events SET demo = NOT demo WHERE id = 6",
    "DELETE FROM events WHERE id IN (8, 9)",
    "UPDATE events SET hash = (SELECT hash FROM events WHERE id = 2) WHERE id = 12",
    "UPDATE events SET seal = 1 WHERE id = 13",
    "UPDATE events SET id = 40 WHERE id = 26",
]


@pytest.mark.parametrize("tampering", TAMPERING)
@pytest.mark.parametrize("rows", [odd_events, lambda: plain(odd_events())])
def test_tampering_is_found_alike(postgres: Engine, tampering: str, rows: Any) -> None:
    write_sealed(postgres, rows())
    with postgres.begin() as conn:
        conn.execute(text(tampering))
    assert compare(postgres)


def sql_style_digest(event: dict[str, Any], escaped: str = "\\n", written: str = "\n") -> str:
    """A forger's hash: the canonical form with text left unescaped (what the server would
    compute if it did not check that the text is printable ASCII), ``escaped`` as ``written``."""
    fields = {name: event.get(name) for name in audit.CHAIN_FIELDS}
    fields["seq"] = event["id"]
    fields["at"] = event["at"].astimezone(UTC).isoformat(timespec="microseconds")
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.replace(escaped, written).encode()).hexdigest()


def forge(engine: Engine, changes: dict[str, Any], escaped: str, written: str) -> None:
    """Edit event 1 of a sealed batch of two and re-hash the batch as a server that writes
    ``escaped`` unescaped would hash it."""
    with engine.begin() as conn:
        conn.execute(update(events).where(events.c.id == 1).values(**changes))
        rows = conn.execute(select(events).order_by(events.c.id)).mappings().all()
        digests = [sql_style_digest(dict(row), escaped, written) for row in rows]
        for row, digest in zip(rows, digests, strict=True):
            conn.execute(update(events).where(events.c.id == row["id"]).values(hash=digest))
        conn.execute(update(seals).values(batch_hash=batch_hash(digests)))


def test_a_batch_forged_over_unescaped_text_is_not_vouched_for(postgres: Engine) -> None:
    write_sealed(postgres, plain(odd_events())[:2])
    forge(postgres, {"detail": "line\nbreak"}, "\\n", "\n")
    assert unvouched(postgres) == [1]
    assert compare(postgres) == [("events", "1", "changed after seal 1 took it"),
                                 ("seals", "1", "its events no longer hash to its batch hash "
                                                "(an event was reordered or rewritten with its "
                                                "hash)")]


@pytest.mark.parametrize(("name", "escaped", "written"),
                         [("ac\"me", '"ac\\"me"', '"ac"me"'),
                          ("ac\\me", '"ac\\\\me"', '"ac\\me"')])
def test_a_batch_forged_over_an_unescaped_name_is_not_vouched_for(
        postgres: Engine, name: str, escaped: str, written: str) -> None:
    """Names and ids go into the server's canonical form as they are: one holding a ``"`` or
    a ``\\`` is left to Python, which escapes it."""
    write_sealed(postgres, plain(odd_events())[:2])
    forge(postgres, {"tenant": name}, escaped, written)
    assert unvouched(postgres) == [1]
    assert compare(postgres)[0] == ("events", "1", "changed after seal 1 took it")
