"""Revocation on the ledger: a dry run reports what the revoke releases and writes nothing,
even in a transaction the caller commits; an agent's tokens are found within one tenant."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, func, select

from mcpbill_cli.clock import utcnow
from mcpbill_cli.keys import init_keyring
from mcpbill_cli.ledger import credit, invariants
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import events, transfers


def request(tenant: str, limit: int, *, parent: str | None = None) -> credit.IssueRequest:
    return credit.IssueRequest(tenant=tenant, agent="crawler", limit=limit, ttl=600,
                               scope=None, audience="mcpbill", issuer="mcpbill", parent=parent,
                               demo=True)


def _counts(engine: Engine) -> tuple[int, int, int]:
    with reading(engine) as conn:
        return (int(conn.execute(select(func.count()).select_from(transfers)).scalar_one()),
                int(conn.execute(select(func.count()).select_from(events)).scalar_one()),
                credit.tenant_balance(conn, "acme").available)


def test_a_committed_dry_run_releases_nothing_and_reports_the_revokes_amounts(
        engine: Engine, tmp_path: Path) -> None:
    signer = init_keyring(tmp_path / "keys", "EdDSA", now=utcnow(), force=False).signing_key()
    with writing(engine) as conn:
        credit.fund_demo(conn, "acme", 3_000_000, now=utcnow())
        parent = credit.issue(conn, request("acme", 2_000_000), signer=signer, ttl_cap=86400,
                              now=utcnow()).claims.jti
        child = credit.issue(conn, request("acme", 500_000, parent=parent), signer=signer,
                             ttl_cap=86400, now=utcnow()).claims.jti
    before = _counts(engine)
    with writing(engine) as conn:  # committed: the dry run must undo its own work
        dry = credit.revoke(conn, [parent], reason=None, clock=utcnow, dry_run=True)
    assert _counts(engine) == before
    with reading(engine) as conn:
        assert credit.show(conn, parent, now=utcnow()).status == "active"
    with writing(engine) as conn:
        done = credit.revoke(conn, [parent], reason=None, clock=utcnow)
    assert dry == done
    assert [(o.jti, o.released, o.tenant) for o in done] == [
        (parent, 1_500_000, "acme"), (child, 500_000, "acme")]
    with reading(engine) as conn:
        assert credit.tenant_balance(conn, "acme").available == 3_000_000
        assert invariants.check(conn) == []


def test_tokens_for_an_agent_are_the_agents_in_that_tenant(engine: Engine,
                                                           tmp_path: Path) -> None:
    signer = init_keyring(tmp_path / "keys", "EdDSA", now=utcnow(), force=False).signing_key()
    jtis = {}
    with writing(engine) as conn:
        for tenant in ("acme", "globex"):
            credit.fund_demo(conn, tenant, 1_000_000, now=utcnow())
            jtis[tenant] = credit.issue(conn, request(tenant, 1_000_000), signer=signer,
                                        ttl_cap=86400, now=utcnow()).claims.jti
    with reading(engine) as conn:
        for tenant, jti in jtis.items():
            assert credit.tokens_for(conn, tenant=tenant, agent="crawler", now=utcnow()) == [
                jti]
