"""The verifier and the pricing table: edits apply without a restart, the daily cap holds."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from mcpbill_cli.errors import BudgetExceeded
from mcpbill_cli.keys import KeySource
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import calls, pricing_versions
from mcpbill_cli.pricing import PricingSource, PricingTable, edit_pricing, set_price
from mcpbill_cli.reconcile import ReconcileOptions, Window, reconcile
from mcpbill_cli.verifier import Verifier

from .billing_support import FakeClock

PRICING_FILE = """version = 4
default_price = "0.01"
[tools.search]
price = "0.01"
[tenants.acme]
daily_cap = "0.05"
"""


@pytest.fixture
def pricing_file(tmp_path: Path) -> Path:
    path = tmp_path / "pricing.toml"
    path.write_text(PRICING_FILE)
    return path


@pytest.fixture
def live_verifier(funded: Engine, keys: KeySource, pricing_file: Path,
                  clock: FakeClock) -> Iterator[Verifier]:
    source = PricingSource(pricing_file, check_interval=0)
    verifier = Verifier(keys=keys, pricing=source, engine=funded, clock=clock)
    yield verifier
    verifier.close()


def test_an_edit_is_charged_at_once_and_the_receipt_names_the_new_version(
        live_verifier: Verifier, new_token: Callable[..., IssuedToken],
        pricing_file: Path) -> None:
    token = new_token(limit=1_000_000).token
    before = live_verifier.charge(token, "search")
    assert (before.amount, before.claims["pricingVersion"]) == (10_000, 4)

    edit_pricing(pricing_file, lambda table: set_price(table, "search", 3_000))
    after = live_verifier.charge(token, "search", args={"q": 2})
    assert (after.amount, after.claims["pricingVersion"]) == (3_000, 5)
    assert after.claims["priceRule"] == "tools.search"


def test_a_broken_edit_keeps_the_last_good_prices(
        live_verifier: Verifier, new_token: Callable[..., IssuedToken],
        pricing_file: Path) -> None:
    token = new_token(limit=1_000_000).token
    pricing_file.write_text('version = 9\n[tools.search]\nprice = "-1"\n')
    receipt = live_verifier.charge(token, "search")
    assert (receipt.amount, receipt.claims["pricingVersion"]) == (10_000, 4)
    assert live_verifier.pricing.last_error is not None


def test_a_tenant_at_its_daily_cap_gets_budget_exceeded_naming_the_cap(
        live_verifier: Verifier, new_token: Callable[..., IssuedToken]) -> None:
    tokens = [new_token(limit=1_000_000).token for _ in range(2)]
    for n in range(5):
        live_verifier.charge(tokens[n % 2], "search", args={"n": n})
    with pytest.raises(BudgetExceeded) as refused:
        live_verifier.charge(tokens[1], "search", args={"n": 5})
    details = refused.value.to_dict()
    assert details["reason"] == "daily_cap" and details["dailyCapUsd"] == "0.05"
    assert "daily cap of 0.05" in details["message"]


def test_the_daily_cap_holds_under_concurrency(
        live_verifier: Verifier, new_token: Callable[..., IssuedToken]) -> None:
    tokens = [new_token(limit=1_000_000).token for _ in range(4)]
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def worker(n: int) -> None:
        barrier.wait()
        for attempt in range(4):
            try:
                live_verifier.charge(tokens[n % 4], "search", args={"n": n, "a": attempt})
                outcomes.append("paid")
            except BudgetExceeded as exc:
                outcomes.append(str(exc.details["reason"]))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("paid") == 5 and outcomes.count("daily_cap") == 27


def test_a_void_gives_the_daily_cap_back(
        live_verifier: Verifier, new_token: Callable[..., IssuedToken]) -> None:
    token = new_token(limit=1_000_000).token
    for n in range(4):
        live_verifier.charge(token, "search", args={"n": n})
    hold = live_verifier.hold(token, "search", args={"n": 4})
    live_verifier.void(hold)
    assert live_verifier.charge(token, "search", args={"n": 5}).amount == 10_000


class EditedBetweenReads(PricingSource):
    """A table edited between any two reads: every read sees the next version."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, check_interval=0)
        self.version = 4

    def current(self) -> PricingTable:
        self.version += 1
        return PricingTable.from_document({**super().current().to_document(),
                                           "version": self.version})


def test_a_call_records_the_very_table_it_was_priced_with(
        funded: Engine, keys: KeySource, pricing_file: Path, clock: FakeClock,
        new_token: Callable[..., IssuedToken]) -> None:
    """However the file changes mid-call, reconcile must find the version a charge names."""
    verifier = Verifier(keys=keys, pricing=EditedBetweenReads(pricing_file), engine=funded,
                        clock=clock)
    token = new_token(limit=1_000_000)
    charged = [verifier.charge(token.token, "search", args={"n": n}).claims["pricingVersion"]
               for n in range(3)]
    with reading(funded) as conn:
        recorded = set(conn.execute(select(pricing_versions.c.version)).scalars())
        priced = set(conn.execute(select(calls.c.pricing_version)).scalars())
    assert priced == set(charged)
    assert priced <= recorded


def test_a_hand_edit_without_a_version_bump_is_charged_under_a_new_version(
        live_verifier: Verifier, funded: Engine, new_token: Callable[..., IssuedToken],
        pricing_file: Path, clock: FakeClock) -> None:
    """Before, the new price was charged as version 4, which the ledger knew with the old
    price: reconcile then reported every such charge as ``charge_price_mismatch``."""
    token = new_token(limit=1_000_000).token
    before = live_verifier.charge(token, "search", args={"n": 1})
    pricing_file.write_text(PRICING_FILE.replace('price = "0.01"\n[tenants',
                                                 'price = "0.003"\n[tenants'))
    after = live_verifier.charge(token, "search", args={"n": 2})
    assert (before.amount, before.claims["pricingVersion"]) == (10_000, 4)
    assert (after.amount, after.claims["pricingVersion"]) == (3_000, 5)
    # the same content read again (another replica, a restart) is the same version
    restarted = Verifier(keys=live_verifier.keys, pricing=PricingSource(pricing_file),
                         engine=funded, clock=clock)
    assert restarted.charge(token, "search", args={"n": 3}).claims["pricingVersion"] == 5
    report = reconcile(funded, ReconcileOptions(window=Window(
        clock() - timedelta(hours=1), clock() + timedelta(hours=1)), now=clock()))
    assert report.findings == ()
    with reading(funded) as conn:
        versions = dict(conn.execute(select(pricing_versions.c.version,
                                            pricing_versions.c.document)).all())
    assert sorted(versions) == [4, 5]
    assert '"version": 5' in versions[5] and '"0.003"' in versions[5]
