"""Fixtures for the verifier tests: keys, pricing, a clock, a funded tenant and a verifier.

Every ledger fixture builds on the root ``engine`` fixture, so each test runs on SQLite and on
PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from mcpbill_cli.keys import KeyRing, KeySource, init_keyring
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier

from .billing_support import PRICING_DOC, USDC, FakeClock, fund, mint


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keys_dir(tmp_path: Path, clock: FakeClock) -> Path:
    directory = tmp_path / "keys"
    init_keyring(directory, "EdDSA", now=clock(), force=False).save()
    return directory


@pytest.fixture
def ring(keys_dir: Path) -> KeyRing:
    return KeyRing.load(keys_dir)


@pytest.fixture
def keys(keys_dir: Path) -> KeySource:
    return KeySource(directory=keys_dir)


@pytest.fixture
def pricing() -> PricingTable:
    return PricingTable.from_document(PRICING_DOC)


@pytest.fixture
def funded(engine: Engine, clock: FakeClock) -> Engine:
    """The ledger with tenant ``acme`` funded with 100 USDC."""
    fund(engine, "acme", 100 * USDC, now=clock())
    return engine


@pytest.fixture
def new_token(funded: Engine, ring: KeyRing, clock: FakeClock) -> Callable[..., IssuedToken]:
    """``new_token(limit=..., scope=..., ...)``: a token of tenant acme, issued now."""

    def make(**options: Any) -> IssuedToken:
        return mint(funded, ring, now=clock(), **options)

    return make


@pytest.fixture
def verifier(funded: Engine, keys: KeySource, pricing: PricingTable,
             clock: FakeClock) -> Iterator[Verifier]:
    verifier = Verifier(keys=keys, pricing=pricing, engine=funded, hold_timeout=300, clock=clock)
    yield verifier
    verifier.close()


@pytest.fixture
def offline(ring: KeyRing, pricing: PricingTable, clock: FakeClock) -> Verifier:
    """A stateless verifier from the JWKS only: checks receipts as a third party would."""
    return Verifier.stateless(jwks=ring.jwks(), pricing=pricing, clock=clock)


@pytest.fixture
def served(funded: Engine, keys: KeySource, pricing: PricingTable, clock: FakeClock
           ) -> Iterator[Verifier]:
    """A verifier that opens the ledger itself, from its URL, as a server does (its paid
    calls run on connections it keeps open: ``ledger.engine.Shelf``)."""
    verifier = Verifier(db_url=funded.url.render_as_string(hide_password=False), keys=keys,
                        pricing=pricing, hold_timeout=300, clock=clock)
    yield verifier
    verifier.close()
