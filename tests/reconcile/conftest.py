"""Fixtures: the small ledger of support.small_ledger on each backend."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine

from .support import Ledger, small_ledger


@pytest.fixture
def ledger(engine: Engine, tmp_path: Path) -> Ledger:
    return small_ledger(engine, tmp_path / "keys")
