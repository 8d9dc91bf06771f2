"""The hash-chained audit trail: appends chain, tampering is found, migration backfills."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Boolean, DateTime, Engine, column, insert, table, text

from mcpbill_cli.clock import utcnow
from mcpbill_cli.ledger import audit
from mcpbill_cli.ledger.engine import make_engine, reading, writing
from mcpbill_cli.ledger.schema import upgrade


def write_events(engine: Engine, count: int) -> None:
    for n in range(count):
        with writing(engine) as conn:
            audit.record(conn, "charge", at=utcnow(), jti=f"tok_{n}", tool="search",
                         amount=1000 + n, detail={"n": n}, demo=n % 2 == 0)


def breaks(engine: Engine) -> list[tuple[int, str]]:
    with reading(engine) as conn:
        return [(b.seq, b.problem) for b in audit.verify_chain(conn)]


def test_an_untouched_chain_verifies(engine: Engine) -> None:
    write_events(engine, 5)
    assert breaks(engine) == []


def test_an_edited_event_is_found(engine: Engine) -> None:
    write_events(engine, 5)
    with engine.begin() as conn:
        conn.execute(text("UPDATE events SET amount = 1 WHERE seq = 3"))
    assert breaks(engine) == [(3, "the event was changed after it was written")]


def test_a_deleted_event_is_found(engine: Engine) -> None:
    write_events(engine, 5)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM events WHERE seq = 2"))
    found = breaks(engine)
    assert (2, "events 2..2 are missing") in found
    assert (3, "prev_hash does not match the event before") in found


def test_deleting_the_last_event_is_found(engine: Engine) -> None:
    write_events(engine, 3)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM events WHERE seq = 3"))
    assert [seq for seq, _ in breaks(engine)] == [3]


def test_migration_chains_the_events_a_0001_ledger_already_had(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine, "0001")
    events_0001 = table("events", column("at", DateTime(timezone=True)), column("kind"),
                        column("tool"), column("amount"), column("demo", Boolean))
    with engine.begin() as conn:
        for n in range(3):
            conn.execute(insert(events_0001).values(
                at=datetime(2026, 11, 27, 12, n, tzinfo=UTC), kind="hold", tool="x", amount=n,
                demo=False))
    upgrade(engine)
    write_events(engine, 2)
    assert breaks(engine) == []
    with reading(engine) as conn:
        assert conn.execute(text("SELECT max(seq) FROM events")).scalar() == 5
    engine.dispose()
