"""Credit lifecycle on the ledger: sweeping expired tokens, child remainders, demo marking,
names the ledger refuses to keep."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import InvalidInput
from mcpbill_cli.keys import init_keyring
from mcpbill_cli.ledger import credit, invariants
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import accounts, tokens, transfers
from mcpbill_cli.wallet.links import link


def request(limit: int, *, ttl: int = 600, parent: str | None = None) -> credit.IssueRequest:
    return credit.IssueRequest(tenant="acme", agent="a", limit=limit, ttl=ttl, scope=None,
                               audience="mcpbill", issuer="mcpbill", parent=parent, demo=True)


def test_sweep_returns_what_expired_tokens_left_and_is_idempotent(
        engine: Engine, tmp_path: Path) -> None:
    signer = init_keyring(tmp_path / "keys", "EdDSA", now=utcnow(), force=False).signing_key()
    past = utcnow() - timedelta(hours=2)
    with writing(engine) as conn:
        credit.fund_demo(conn, "acme", 5_000_000, now=past)
        old = credit.issue(conn, request(2_000_000, ttl=60), signer=signer, ttl_cap=86400,
                           now=past)
        live = credit.issue(conn, request(1_000_000), signer=signer, ttl_cap=86400,
                            now=utcnow())
    with writing(engine) as conn:
        assert credit.sweep(conn, now=utcnow()) == [(old.claims.jti, 2_000_000)]
    with writing(engine) as conn:
        assert credit.sweep(conn, now=utcnow()) == []
    with reading(engine) as conn:
        balance = credit.tenant_balance(conn, "acme")
        assert (balance.available, balance.allotted) == (4_000_000, 1_000_000)
        assert credit.show(conn, old.claims.jti, now=utcnow()).status == "expired"
        assert credit.show(conn, live.claims.jti, now=utcnow()).status == "active"
        assert invariants.check(conn) == []


def test_revoking_a_child_returns_its_remainder_to_the_active_parent(
        engine: Engine, tmp_path: Path) -> None:
    signer = init_keyring(tmp_path / "keys", "EdDSA", now=utcnow(), force=False).signing_key()
    with writing(engine) as conn:
        credit.fund_demo(conn, "acme", 3_000_000, now=utcnow())
        parent = credit.issue(conn, request(2_000_000), signer=signer, ttl_cap=86400,
                              now=utcnow())
        child = credit.issue(conn, request(500_000, parent=parent.claims.jti), signer=signer,
                             ttl_cap=86400, now=utcnow())
    with writing(engine) as conn:
        [outcome] = credit.revoke(conn, [child.claims.jti], reason=None, clock=utcnow)
        assert (outcome.released, outcome.cascaded_from) == (500_000, None)
    with reading(engine) as conn:
        assert credit.show(conn, parent.claims.jti, now=utcnow()).remaining == 2_000_000
        assert credit.tenant_balance(conn, "acme").available == 1_000_000
        demo_flags = set(conn.execute(select(transfers.c.demo)).scalars())
        assert demo_flags == {True}
        assert invariants.check(conn) == []


NOT_NAMES = ["", " ", "acme ", "x\x1b]0;pwned\x07y", "a\nb", "caf\udce9", "t" * 101]


def _rows(engine: Engine) -> dict[str, list[tuple[object, ...]]]:
    with reading(engine) as conn:
        return {table.name: sorted(map(tuple, conn.execute(select(table))), key=repr)
                for table in (accounts, transfers, tokens)}


@pytest.mark.parametrize("tenant", NOT_NAMES)
def test_funding_refuses_a_tenant_that_is_not_a_name(engine: Engine, tenant: str) -> None:
    before = _rows(engine)
    with pytest.raises(InvalidInput) as refused, writing(engine) as conn:
        credit.fund_demo(conn, tenant, 1_000_000, now=utcnow())
    assert refused.value.details == {"field": "tenant"}
    with pytest.raises(InvalidInput) as unlinked:
        link(engine, tenant, "0x" + "ab" * 20)
    assert unlinked.value.details == {"field": "tenant"}
    assert _rows(engine) == before


@pytest.mark.parametrize(("field", "bad"), [
    *(("tenant", name) for name in NOT_NAMES), *(("agent", name) for name in NOT_NAMES[:-1]),
    ("agent", "a" * 201), ("audience", " "), ("audience", "mcpbill "), ("issuer", " "),
    ("issuer", "\tmcpbill")])
def test_issue_refuses_a_name_the_token_cannot_carry(
        engine: Engine, tmp_path: Path, field: str, bad: str) -> None:
    signer = init_keyring(tmp_path / "keys", "EdDSA", now=utcnow(), force=False).signing_key()
    with writing(engine) as conn:
        credit.fund_demo(conn, "acme", 5_000_000, now=utcnow())
    before = _rows(engine)
    with pytest.raises(InvalidInput) as refused, writing(engine) as conn:
        credit.issue(conn, replace(request(1_000_000), **{field: bad}), signer=signer,
                     ttl_cap=86400, now=utcnow())
    assert refused.value.details == {"field": field}
    assert _rows(engine) == before
