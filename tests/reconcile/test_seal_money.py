"""The ledger sums to zero at every seal: each seal signs what the transfers its events name
add up to, per class of account, and reconcile sums them again per seal. A transfer edited,
deleted and written again, or re-dated after sealing is found at its seal, on SQLite and
PostgreSQL, by someone without the signing key and by a sealer that got its sums wrong."""

from __future__ import annotations

import json
from datetime import timedelta

import jwt
from sqlalchemy import func, select, update

from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import events, seals, transfers
from mcpbill_cli.ledger.seal_money import Money, named_transfer, named_transfer_sql
from mcpbill_cli.ledger.seals import SEAL_TYPE, read_seals
from mcpbill_cli.reconcile import seal_py

from .support import USDC, Ledger, rows_of
from .test_tampering import seal_hash


def sealed(ledger: Ledger) -> dict[int, Money | None]:
    with reading(ledger.engine) as conn:
        return {seal.number: seal.money for seal in read_seals(conn)}


def test_each_seal_signs_the_money_of_its_transfers_and_it_sums_to_zero(ledger: Ledger) -> None:
    """Seal 1: two demo fundings (150 USDC), two tokens of 10 USDC allotted, a charge of
    0.005 (acme's search) and one of 0.05 (globex's translate)."""
    money = sealed(ledger)
    assert money[1] is not None and money[1].claim() == {
        "transfers": 6, "amount": 170 * USDC + 55_000,
        "posted": {"chain": -150 * USDC, "tenant": 130 * USDC, "token": 20 * USDC - 55_000,
                   "revenue": 55_000},
        "pending": {}}
    assert all(m is not None and m.balanced for m in money.values())
    with reading(ledger.engine) as conn:
        [seal] = [s for s in read_seals(conn) if s.number == 1]
    key = KeyRing.load(ledger.keys_dir).signature_keys()[seal.kid]
    assert jwt.decode(seal.jws, key.key, algorithms=[key.alg])["money"] == money[1].claim()
    assert rows_of(ledger.reconcile()) == []


def test_a_transfer_edited_after_sealing_is_found_at_its_seal(ledger: Ledger) -> None:
    """acme's demo funding made 1 larger, both accounts' sums with it: the books balance and
    every account matches its transfers; seal 1 remembers what moved, and the deposit's
    sealed event its amount."""
    ledger.sql("UPDATE transfers SET amount = amount + 1 WHERE code = 'deposit' "
               "AND credit_account_id = 'tenant:acme'")
    ledger.sql("UPDATE accounts SET debits_posted = debits_posted + 1 WHERE id = 'chain:demo'")
    ledger.sql("UPDATE accounts SET credits_posted = credits_posted + 1 "
               "WHERE id = 'tenant:acme'")
    report = ledger.reconcile()
    assert [(name, severity) for name, severity, _ in rows_of(report)] == [
        ("seal_money_mismatch", "error"), ("event_transfer_mismatch", "error")]
    assert rows_of(report)[0][2] == ["seals/1"]
    assert report.findings[0].rows[0].detail.startswith("the transfers its events name add up")


def test_a_transfer_deleted_and_inserted_again_after_sealing(ledger: Ledger) -> None:
    """The charge of seal 1 written again from the token to the tenant (a refund no one made):
    its event still names it, the classes it moved between changed."""
    charge = ledger.calls["charge"]
    with ledger.engine.begin() as conn:
        row = dict(conn.execute(select(transfers).where(
            transfers.c.id == f"charge:{charge}")).mappings().one())
        conn.execute(transfers.delete().where(transfers.c.id == row["id"]))
        conn.execute(transfers.insert().values(**{**row, "credit_account_id": "tenant:acme"}))
    report = ledger.reconcile()
    assert ("seal_money_mismatch", "error", ["seals/1"]) in rows_of(report)


def test_a_transfer_re_dated_out_of_its_seal(ledger: Ledger) -> None:
    charge2 = ledger.calls["charge2"]
    ledger.sql("UPDATE transfers SET created_at = :at WHERE id = :t",
               at=ledger.clock() - timedelta(days=40), t=f"charge:{charge2}")
    report = ledger.reconcile()
    assert ("seal_money_mismatch", "error", ["seals/1"]) in rows_of(report)


def test_a_seal_whose_money_does_not_sum_to_zero(ledger: Ledger) -> None:
    """A sealer that summed wrong, with the operator's own key: the signature holds, the sum
    to zero does not."""
    with reading(ledger.engine) as conn:
        last = list(read_seals(conn))[-1]
    assert last.money is not None
    claim = {**last.money.claim(), "posted": {**last.money.claim()["posted"], "chain": 1}}
    fields = {k: v for k, v in last.claims().items() if k != "hash"}
    fields["money"] = claim
    digest = seal_hash(fields)
    info, key = KeyRing.load(ledger.keys_dir).signing_key()
    jws = jwt.encode({**fields, "hash": digest}, key, algorithm=info.alg,
                     headers={"kid": info.kid, "typ": SEAL_TYPE})
    with ledger.engine.begin() as conn:
        conn.execute(update(seals).where(seals.c.number == last.number).values(
            money=json.dumps(claim, sort_keys=True, separators=(",", ":")), hash=digest,
            jws=jws, kid=info.kid))
    report = ledger.reconcile()
    assert rows_of(report) == [("seal_money_mismatch", "error", [f"seals/{last.number}"])]
    assert report.findings[0].rows[0].detail.startswith(
        "the money it sealed does not sum to zero")


def test_a_revoked_tokens_remainder_is_sealed_with_its_release_event(ledger: Ledger) -> None:
    from mcpbill_cli.ledger.credit import revoke
    from mcpbill_cli.ledger.engine import writing

    jti = ledger.tokens["globex"].claims.jti
    with writing(ledger.engine) as conn:
        [done] = revoke(conn, [jti], reason=None, clock=ledger.clock)
    ledger.seal()
    money = sealed(ledger)
    assert money[3] is not None and money[3].claim() == {
        "transfers": 1, "amount": done.released,
        "posted": {"tenant": done.released, "token": -done.released}, "pending": {}}
    assert done.released == 10 * USDC - 50_000
    assert rows_of(ledger.reconcile()) == []


# Events as they come, and as someone with write access could leave them: each names the
# transfer Python's sealer names (or none), in every SQL that sums a seal's money again.
NAMING = [("issue", None, "j1"), ("issue", "", "j1"), ("issue", "parent", "j1"),
          ("issue", None, None), ("deposit", "deposit:0xab", None), ("deposit", "0xab", None),
          ("deposit", "DEPOSIT:0xab", None), ("deposit", None, None), ("capture", "c1", None),
          ("capture", None, None), ("refund", "rfnd_1", None), ("topup", "topup:t1", None),
          ("release", None, None), ("refusal", "x", "j1"), ("revoke", None, "j1")]


def test_sql_names_the_transfer_of_each_event_as_the_sealer_does(ledger: Ledger) -> None:
    with ledger.engine.begin() as conn:
        row = dict(conn.execute(select(events).order_by(events.c.id).limit(1)).mappings().one())
        top = int(conn.execute(select(func.max(events.c.id))).scalar_one())
        conn.execute(events.insert(), [
            {**row, "id": top + n, "kind": kind, "ref": ref, "jti": jti, "seal": None}
            for n, (kind, ref, jti) in enumerate(NAMING, 1)])
        added = events.c.id > top
        in_sql = conn.execute(select(named_transfer_sql()).where(added)
                              .order_by(events.c.id)).scalars().all()
        in_sqlite = None if conn.dialect.name != "sqlite" else [
            name for (name,) in conn.exec_driver_sql(
                f"SELECT {seal_py._NAMED} FROM events AS e WHERE e.id > ? ORDER BY e.id",  # noqa: S608
                (top,))]
        conn.rollback()
    expected = [named_transfer(kind, ref, jti) for kind, ref, jti in NAMING]
    assert in_sql == expected
    assert in_sqlite in (None, expected)
