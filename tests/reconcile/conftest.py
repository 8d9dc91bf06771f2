"""Fixtures: the small ledger of support.small_ledger on each backend, and (from the wallet
tests) the in-process EVM with a test USDC for --onchain."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.wallet.conftest import devnet, tester_devnet, token_build  # noqa: F401 - fixtures

from .support import Ledger, small_ledger
from .test_cli import cli, home_ledger  # noqa: F401 - fixtures (test_events_export uses them)


@pytest.fixture
def ledger(engine: Engine, tmp_path: Path) -> Ledger:
    return small_ledger(engine, tmp_path / "keys")
