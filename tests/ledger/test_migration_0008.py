"""Schema 0008 on a ledger sealed by 0007 code: its seals gain an empty ``money``, verify as
they did, and every seal written after the upgrade signs its money, which reconcile checks."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, insert, inspect, select, update

from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger.audit import GENESIS
from mcpbill_cli.ledger.credit import fund_demo
from mcpbill_cli.ledger.engine import current_revision, reading, writing
from mcpbill_cli.ledger.models import SCHEMA_REVISION, events, seals
from mcpbill_cli.ledger.schema import upgrade
from mcpbill_cli.ledger.sealing import seal_all
from mcpbill_cli.ledger.seals import _hashed_fields, _seal_hash, batch_hash, signer, take_pending
from mcpbill_cli.reconcile import ReconcileOptions, Window, reconcile

from .test_migration_0006 import DAY, a_0005_ledger


def seal_as_0007(engine: Engine, keys_dir: Path) -> None:
    """Seal what is pending as 0007 code did: the same claims, without money."""
    info, key = KeyRing.load(keys_dir).signing_key()
    with writing(engine) as conn:
        pending = take_pending(conn)
        assert pending is not None
        fields = _hashed_fields(1, pending.ids[0], pending.ids[-1], len(pending.ids),
                                batch_hash(pending.digests), GENESIS, DAY, None)
        digest = _seal_hash(fields)
        kid, jws = signer(info.alg, info.kid, key)({**fields, "hash": digest})
        conn.execute(insert(seals)
                     .values(number=1, first_id=pending.ids[0], last_id=pending.ids[-1],
                             count=len(pending.ids), batch_hash=fields["batchHash"],
                             prev_hash=GENESIS, hash=digest, sealed_at=DAY, kid=kid, jws=jws))
        for event_id, own in zip(pending.ids, pending.digests, strict=True):
            conn.execute(update(events).where(events.c.id == event_id)
                         .values(seal=1, hash=own))


def test_seals_of_0007_keep_verifying_and_new_seals_carry_their_money(
        db_url: str, tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    engine = a_0005_ledger(db_url, keys_dir)
    try:
        upgrade(engine, "0007")
        old_columns = {c["name"] for c in inspect(engine).get_columns("seals")}
        assert "money" not in old_columns
        seal_as_0007(engine, keys_dir)

        assert upgrade(engine) == ("0007", SCHEMA_REVISION)

        assert current_revision(engine) == SCHEMA_REVISION
        with reading(engine) as conn:
            assert conn.execute(select(seals.c.number, seals.c.money)).all() == [(1, None)]
        with writing(engine) as conn:
            fund_demo(conn, "acme", 2_000_000, now=DAY + timedelta(minutes=1))
        info, key = KeyRing.load(keys_dir).signing_key()
        [new] = seal_all(engine, signer(info.alg, info.kid, key), clock=lambda: DAY)
        assert new.number == 2 and new.money is not None
        assert new.money.claim() == {"transfers": 1, "amount": 2_000_000,
                                     "posted": {"chain": -2_000_000, "tenant": 2_000_000},
                                     "pending": {}}
        upgrade(engine)  # reconcile reads a ledger at the current schema, as the CLI requires
        window = Window.day(DAY.date())
        options = ReconcileOptions(window=window, chain="full", keys_dir=keys_dir,
                                   now=window.end + timedelta(hours=1), jobs=1)
        assert reconcile(engine, options).findings == ()
    finally:
        engine.dispose()
