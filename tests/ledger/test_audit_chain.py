"""The audit trail's append and its history: ``audit.record`` is a plain INSERT (no chain
field, nothing shared locked), and ledgers hash-chained by schemas 0002-0004 upgrade to the
sealed trail only when their chain verifies, their events left for the first sealer.

Sealing itself (batches, links, signatures, tampering) is tested in test_seals.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Boolean, DateTime, Engine, column, insert, select, table, text
from sqlalchemy.exc import DBAPIError

from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import AuditChainBroken
from mcpbill_cli.keys import init_keyring
from mcpbill_cli.ledger import audit
from mcpbill_cli.ledger.engine import make_engine, reading, writing
from mcpbill_cli.ledger.models import events
from mcpbill_cli.ledger.schema import upgrade
from mcpbill_cli.ledger.sealing import seal_all
from mcpbill_cli.ledger.seals import read_seals, signer, verify_batch

AT = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
e = events.c


def write_events(engine: Engine, count: int) -> None:
    for n in range(count):
        with writing(engine) as conn:
            audit.record(conn, "charge", at=utcnow(), jti=f"tok_{n}", tool="search",
                         amount=1000 + n, detail={"n": n}, demo=n % 2 == 0)


def seal_everything(engine: Engine, tmp_path: Path) -> int:
    """Seal with a fresh key ring; the number of events sealed, after checking every batch."""
    info, key = init_keyring(tmp_path / "keys", "EdDSA", now=utcnow(), force=False).signing_key()
    made = seal_all(engine, signer(info.alg, info.kid, key), clock=utcnow)
    with reading(engine) as conn:
        assert [b for seal in read_seals(conn) for b in verify_batch(conn, seal)] == []
    return sum(seal.count for seal in made)


def test_record_appends_an_unsealed_event(engine: Engine) -> None:
    write_events(engine, 3)
    with reading(engine) as conn:
        rows = conn.execute(select(e.id, e.seal, e.hash, e.detail).order_by(e.id)).all()
    assert [(row.seal, row.hash) for row in rows] == [(None, None)] * 3
    assert [row.detail for row in rows] == ['{"n": 0}', '{"n": 1}', '{"n": 2}']
    assert rows[0].id < rows[1].id < rows[2].id


def test_the_audit_head_row_is_gone(engine: Engine) -> None:
    """No row every event writer updates: the old chain's head serialised every paid call."""
    with reading(engine) as conn, pytest.raises(DBAPIError, match="audit_head"):
        conn.execute(text("SELECT seq FROM audit_head"))


def test_a_0001_ledger_upgrades_to_events_the_first_sealer_takes(db_url: str,
                                                                 tmp_path: Path) -> None:
    engine = make_engine(db_url)
    upgrade(engine, "0001")
    events_0001 = table("events", column("at", DateTime(timezone=True)), column("kind"),
                        column("tool"), column("amount"), column("demo", Boolean))
    with engine.begin() as conn:
        for n in range(3):
            conn.execute(insert(events_0001).values(at=AT + timedelta(minutes=n), kind="hold",
                                                    tool="x", amount=n, demo=False))
    upgrade(engine)
    write_events(engine, 2)
    with reading(engine) as conn:
        assert conn.execute(select(e.id).where(e.seal.is_(None)).order_by(e.id)
                            ).scalars().all() == [1, 2, 3, 4, 5]
    assert seal_everything(engine, tmp_path) == 5
    engine.dispose()


def write_0004_chain(engine: Engine, count: int) -> None:
    """Events as schema 0004 wrote them: each with its ``seq``, the hash before and its own."""
    chained = table("events", *(column(f) for f in audit.CHAIN_FIELDS if f not in ("at", "demo")),
                    column("at", DateTime(timezone=True)), column("demo", Boolean),
                    column("prev_hash"), column("hash"))
    head = audit.GENESIS
    with engine.begin() as conn:
        for seq in range(1, count + 1):
            event = {"seq": seq, "at": AT + timedelta(seconds=seq), "kind": "charge",
                     "jti": f"tok_{seq}", "tool": "search", "amount": seq, "demo": False}
            digest = audit.event_hash(head, event)
            conn.execute(insert(chained).values(**event, prev_hash=head, hash=digest))
            head = digest
        conn.execute(text("UPDATE audit_head SET seq = :s, hash = :h WHERE id = 1"),
                     {"s": count, "h": head})


def test_a_0004_chain_that_verifies_is_sealed_after_the_upgrade(db_url: str,
                                                                tmp_path: Path) -> None:
    engine = make_engine(db_url)
    upgrade(engine, "0004")
    write_0004_chain(engine, 4)
    upgrade(engine)
    with reading(engine) as conn:
        assert conn.execute(select(e.hash).where(e.hash.is_not(None))).all() == []
    assert seal_everything(engine, tmp_path) == 4
    engine.dispose()


def test_a_0004_chain_that_does_not_verify_is_not_upgraded(db_url: str) -> None:
    """Sealing a forged history would vouch for it: the upgrade refuses and says what to do."""
    engine = make_engine(db_url)
    upgrade(engine, "0004")
    write_0004_chain(engine, 4)
    with engine.begin() as conn:
        conn.execute(text("UPDATE events SET amount = 99 WHERE seq = 2"))
    with pytest.raises(AuditChainBroken, match=r"breaks at event 2.*--chain full"):
        upgrade(engine)
    engine.dispose()
