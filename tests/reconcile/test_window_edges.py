"""A day's reconcile checks the seals at its edges too: a seal emptied of its events at
midnight (they, their transfers, calls and account sums deleted: nothing left in any day) and
a seal written after the last without events (a copy of an old one) are found by the day
beside them, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine, insert, select

from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import events, seals
from mcpbill_cli.reconcile import Window

from .support import DAY, Ledger, new_ledger


def across_midnight(engine: Engine, keys_dir: object) -> Ledger:
    """Seal 1: the funding; seal 2: the day's last calls (23:59); seal 3: the next day's."""
    ledger = new_ledger(engine, keys_dir)  # type: ignore[arg-type]
    token = ledger.mint("acme", ttl=86400).token
    ledger.seal()
    ledger.clock.advance(14 * 3600 + 59 * 60)  # 23:59 on DAY
    ledger.calls.update({f"late{n}": ledger.verifier.charge(token, "search", args={"n": n})
                         .receipt_id for n in range(3)})
    ledger.seal()
    ledger.clock.advance(120)  # 00:01 the next day
    ledger.calls.update({f"early{n}": ledger.verifier.charge(token, "search", args={"n": n})
                         .receipt_id for n in range(3, 5)})
    ledger.seal()
    return ledger


def audit_rows(ledger: Ledger, day_offset: int) -> list[str]:
    report = ledger.reconcile(window=Window.day(DAY + timedelta(days=day_offset)))
    return [f"{row.table}/{row.key}" for finding in report.findings
            if finding.name == "audit_chain_broken" for row in finding.rows]


def test_the_last_seal_of_a_day_emptied_with_its_money_is_found(
        engine: Engine, tmp_path: object) -> None:
    ledger = across_midnight(engine, tmp_path / "keys")  # type: ignore[operator]
    assert audit_rows(ledger, 0) == [] and audit_rows(ledger, 1) == []
    with reading(engine) as conn:
        last_of_day = conn.execute(select(events.c.seal).where(
            events.c.ref == ledger.calls["late0"])).scalar_one()
    jti = ledger.tokens["acme"].claims.jti
    for ref in (ledger.calls[f"late{n}"] for n in range(3)):  # gone without a trace
        ledger.sql("UPDATE accounts SET debits_posted = debits_posted - "
                   "(SELECT amount FROM transfers WHERE id = 'charge:' || :r) WHERE id = :t",
                   r=ref, t=f"token:{jti}")
        ledger.sql("UPDATE accounts SET credits_posted = credits_posted - "
                   "(SELECT amount FROM transfers WHERE id = 'charge:' || :r) "
                   "WHERE id = (SELECT credit_account_id FROM transfers "
                   "WHERE id = 'charge:' || :r)", r=ref)
        ledger.sql("DELETE FROM transfers WHERE id = 'charge:' || :r", r=ref)
        ledger.sql("DELETE FROM calls WHERE id = :r", r=ref)
    ledger.sql("DELETE FROM events WHERE seal = :s", s=last_of_day)
    assert f"seals/{last_of_day}" in audit_rows(ledger, 0)
    assert f"seals/{last_of_day}" in audit_rows(ledger, 1)


def test_a_copy_of_an_old_seal_written_after_the_last_is_found(
        engine: Engine, tmp_path: object) -> None:
    ledger = across_midnight(engine, tmp_path / "keys")  # type: ignore[operator]
    with reading(engine) as conn:
        first = conn.execute(select(seals).where(seals.c.number == 1)).mappings().one()
        last = conn.execute(select(seals.c.number).order_by(seals.c.number.desc())).scalar()
    with engine.begin() as conn:
        conn.execute(insert(seals).values({**first, "number": last + 1}))
    assert f"seals/{last + 1}" in audit_rows(ledger, 1)
