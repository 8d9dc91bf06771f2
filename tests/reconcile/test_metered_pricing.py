"""Per-unit prices are checked in SQL during the calls scan; the verdict must be exactly the
one ``pricing.quote`` gives in Python, for every tenant, kind of call, units and amounts."""

from __future__ import annotations

import json
import random
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, insert

from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import calls, pricing_versions
from mcpbill_cli.pricing import PricingTable, quote
from mcpbill_cli.reconcile import Window
from mcpbill_cli.reconcile.call_checks import Charge, PriceCheck, price_problem
from mcpbill_cli.reconcile.calls_pass import call_groups
from mcpbill_cli.reconcile.collect import Findings

from .support import DAY, PRICING

OVERRIDES: dict[str, Any] = {
    "version": 3,
    "tools": {"summarize": {"price_per_unit": "0.00002", "max_price": "0.30"},
              "search": {"price": "0.01"}},
    "tenants": {"acme": {"tools": {"summarize": {"price": "0.07"}}},
                "globex": {"discount_percent": 10},
                "initech": {"tools": {"search": {"price_per_unit": "0.000003",
                                                 "max_price": "0.02"}}}},
}
TENANTS = ("acme", "globex", "initech", "unlisted")


def a_call(rng: random.Random, table: PricingTable, n: int) -> dict[str, Any]:
    """A captured call, priced right about half of the time."""
    tenant, tool = rng.choice(TENANTS), rng.choice(("summarize", "search"))
    kind = rng.choice(("charge", "hold"))
    units = rng.choice((None, 0, 1, rng.randrange(1, 100_000), 10**7))
    price = quote(table, tool, tenant=tenant)
    held = price.amount if kind == "hold" or units is None else price.for_units(units)
    if kind == "hold" and price.per_unit is not None and rng.random() < 0.3:
        held = rng.randrange(0, price.amount + 1)  # held for max_units
    amount = held if units is None else min(price.for_units(units), held)
    if rng.random() < 0.5:
        amount, held = amount + rng.choice((-1, 1, 1000)), held + rng.choice((0, 0, 1))
    call_id = f"rcpt_{table.version}_{n}"
    return {"id": call_id, "idempotency_key": call_id, "request_hash": "0" * 64,
            "jti": f"tok_{call_id}", "tenant": tenant, "agent": "a", "tool": tool,
            "units": units, "amount_held": held, "amount": amount, "status": "captured",
            "transfer_id": f"{'charge' if kind == 'charge' else 'capture'}:{call_id}",
            "pricing_version": table.version, "price_rule": f"tools.{tool}", "receipt": "r",
            "demo": False,
            "created_at": Window.day(DAY).start + timedelta(seconds=n)}


def test_sql_and_python_agree_on_every_per_unit_price(engine: Engine) -> None:
    rng = random.Random(7)
    tables = [PricingTable.from_document(PRICING), PricingTable.from_document(OVERRIDES)]
    rows = [a_call(rng, table, n) for table in tables for n in range(150)]
    with writing(engine) as conn:
        for table in tables:
            conn.execute(insert(pricing_versions).values(
                version=table.version, recorded_at=Window.day(DAY).start,
                document=json.dumps(table.to_document()), digest=table.digest))
        conn.execute(insert(calls), rows)
    by_jti = {row["jti"]: row for row in rows}
    in_sql = 0
    with reading(engine) as conn:
        check = PriceCheck(conn, Window.day(DAY), Findings(10))
        for group in call_groups(conn, Window.day(DAY), check.terms()):
            row = by_jti[group.jti]
            charge = Charge(row["tool"], row["tenant"], group.kind, row["units"],
                            row["amount_held"], row["amount"])
            right = price_problem(check.tables[group.pricing_version], charge) is None
            if group.price_ok is not None:
                in_sql += 1
                assert bool(group.price_ok) == right, (row, group)
            else:
                assert (group.amount_held, group.amount) == (row["amount_held"], row["amount"])
    assert in_sql > 100
