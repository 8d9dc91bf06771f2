"""Schema 0010 on a ledger with deposits credited at 0009 (keyed by the block-wide log index):
the old rows keep their ids and get no position; meeting the same transfer again, re-mined at
another log index, adopts the old row instead of crediting it twice; the downgrade restores the
old key."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine, inspect, select, text

from mcpbill_cli.ledger import ops
from mcpbill_cli.ledger.engine import current_revision, make_engine, reading, writing
from mcpbill_cli.ledger.models import SCHEMA_REVISION, accounts, deposits
from mcpbill_cli.ledger.schema import _alembic_config, upgrade
from mcpbill_cli.wallet.crediting import Deposit, credit_deposit, find_recorded

DAY = datetime(2031, 3, 14, 9, tzinfo=UTC)
CHAIN = "eip155:8453"
TX = "0x" + "ab" * 32
ALICE = "0x" + "11" * 20
BOB = "0x" + "22" * 20
HERE = "0x" + "33" * 20
USDC = "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"


def transfer(log_index: int, position: int | None, sender: str = ALICE,
             amount: int = 5_000_000) -> Deposit:
    return Deposit(chain=CHAIN, tx_hash=TX, log_index=log_index, position=position,
                   block_number=100, sender=sender, recipient=HERE, token=USDC, amount=amount)


def credit_at_0009(engine: Engine, deposit: Deposit) -> None:
    """What mcpbill before 0010 wrote for a credited deposit (id ``<chain>:<tx>:<log index>``)."""
    deposit_id = f"{CHAIN}:{TX}:{deposit.log_index}"
    with writing(engine) as conn:
        ops.ensure_account(conn, ops.chain_account(CHAIN), kind="chain", guarded=False, at=DAY)
        ops.ensure_account(conn, "tenant:acme", kind="tenant", guarded=True, at=DAY)
        ops.transfer(conn, id=f"deposit:{deposit_id}", debit=ops.chain_account(CHAIN),
                     credit="tenant:acme", amount=deposit.amount, code="deposit", at=DAY,
                     ref=deposit_id)
        conn.execute(text(
            "INSERT INTO deposits (id, chain, tx_hash, log_index, block_number, sender, "
            "recipient, token_address, amount, tenant, status, transfer_id, seen_at, "
            "credited_at) VALUES (:id, :chain, :tx, :log, 100, :sender, :to, :token, :amount, "
            "'acme', 'credited', :transfer, :at, :at)"),
            {"id": deposit_id, "chain": CHAIN, "tx": TX, "log": deposit.log_index,
             "sender": deposit.sender, "to": HERE, "token": USDC, "amount": deposit.amount,
             "transfer": f"deposit:{deposit_id}", "at": DAY})


def acme(engine: Engine) -> int:
    a = accounts.c
    with reading(engine) as conn:
        return int(conn.execute(select(a.credits_posted - a.debits_posted)
                                .where(a.id == "tenant:acme")).scalar_one())


def a_0009_ledger(db_url: str) -> Engine:
    engine = make_engine(db_url)
    assert upgrade(engine, "0009") == (None, "0009")
    credit_at_0009(engine, transfer(log_index=3, position=None))
    credit_at_0009(engine, transfer(log_index=4, position=None, sender=BOB, amount=2_000_000))
    return engine


def test_old_deposits_are_adopted_not_credited_again_after_re_mining(db_url: str) -> None:
    engine = a_0009_ledger(db_url)
    try:
        assert upgrade(engine) == ("0009", SCHEMA_REVISION)
        d = deposits.c
        with reading(engine) as conn:
            rows = conn.execute(select(d.id, d.tx_log_position).order_by(d.log_index)).all()
        assert [tuple(row) for row in rows] == [(f"{CHAIN}:{TX}:3", None),
                                                (f"{CHAIN}:{TX}:4", None)]
        # Re-mined after a reorg: the same two transfers at other block-wide log indexes.
        with writing(engine) as conn:
            assert credit_deposit(conn, transfer(log_index=9, position=1), "acme", DAY) is False
            assert credit_deposit(conn, transfer(log_index=8, position=0, sender=BOB,
                                                 amount=2_000_000), "acme", DAY) is False
            adopted = find_recorded(conn, transfer(log_index=9, position=1))
        assert adopted is not None and adopted.id == f"{CHAIN}:{TX}:3"
        with reading(engine) as conn:
            positions = conn.execute(select(d.id, d.tx_log_position).order_by(d.log_index)).all()
        assert [tuple(row) for row in positions] == [(f"{CHAIN}:{TX}:3", 1),
                                                     (f"{CHAIN}:{TX}:4", 0)]
        assert acme(engine) == 7_000_000
        # A third transfer of the same transaction is new: credited under the new key.
        with writing(engine) as conn:
            assert credit_deposit(conn, transfer(log_index=10, position=2, amount=1), "acme",
                                  DAY) is True
        assert acme(engine) == 7_000_001
    finally:
        engine.dispose()


def test_downgrade_restores_the_log_index_key(db_url: str) -> None:
    from alembic import command

    engine = a_0009_ledger(db_url)
    try:
        upgrade(engine)
        with writing(engine) as conn:
            command.downgrade(_alembic_config(conn), "0009")
        assert current_revision(engine) == "0009"
        assert "tx_log_position" not in {c["name"] for c in inspect(engine).get_columns(
            "deposits")}
        assert "uq_deposits_log" in {u["name"] for u in inspect(engine).get_unique_constraints(
            "deposits")}
        assert upgrade(engine) == ("0009", SCHEMA_REVISION)
    finally:
        engine.dispose()
