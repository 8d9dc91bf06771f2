"""``--verify-receipts``: every captured call's receipt, its signature and its signed fields.

Keys: every key in ``keyring.json``, whatever its status. A retired or lapsed key verifies no
new token, but a receipt is a record of the past: it was signed while the key was in use, and
it should verify for as long as it is kept. (A key retired because it leaked could sign a
forgery after the fact; the signed fields are still checked against the call row.)

Ed25519 verification costs ~100-250 µs a receipt, so a day of a million charges is split into
time slices verified by worker processes, each reading its own slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import KeyRing, VerificationKey
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import calls
from mcpbill_cli.receipts import verify_receipt
from mcpbill_cli.reconcile.collect import Findings
from mcpbill_cli.reconcile.model import Filters, Row, Window
from mcpbill_cli.reconcile.parallel import SliceResult, engine_url, run_slices, worker_engine

c = calls.c
BATCH = 2000
PARALLEL_FROM = 5_000  # receipts: above this, workers pay for their start-up


@dataclass(frozen=True)
class ReceiptSlice:
    url: str
    keys_dir: Path
    start: datetime
    end: datetime
    filters: Filters
    max_rows: int


def receipt_keys(keys_dir: Path) -> dict[str, VerificationKey]:
    """Every key of the key ring, active, verifying, lapsed or retired, by kid."""
    return KeyRing.load(keys_dir).signature_keys()


def check_receipts(engine: Engine, conn: Connection, window: Window, filters: Filters,
                   keys_dir: Path, jobs: int, found: Findings) -> int:
    """Verify the window's receipts; returns how many were checked."""
    receipt_keys(keys_dir)  # a missing key ring fails here, before any worker starts
    count = conn.execute(_filtered(select(func.count()), window.start, window.end,
                                   filters)).scalar_one()
    parts = max(1, jobs) * 4 if count >= PARALLEL_FROM and jobs > 1 else 1
    span = (window.end - window.start) / parts
    slices = [ReceiptSlice(engine_url(engine), keys_dir, window.start + span * n,
                           window.end if n == parts - 1 else window.start + span * (n + 1),
                           filters, found.max_rows) for n in range(parts)]
    work = partial(_verify_slice, conn) if parts == 1 else _verify_in_worker
    checked = 0
    for result in run_slices(work, slices, jobs):
        checked += result.checked
        for name, n in result.counts.items():
            found.note(name, n)
            for row in result.rows[name]:
                found.show(name, row)
    return checked


def _filtered(query: Any, start: datetime, end: datetime, filters: Filters) -> Any:
    query = query.where(c.status == "captured", c.created_at >= start, c.created_at < end)
    for column, value in ((c.tenant, filters.tenant), (c.agent, filters.agent),
                          (c.tool, filters.tool)):
        if value is not None:
            query = query.where(column == value)
    return query


def _verify_in_worker(part: ReceiptSlice) -> SliceResult:
    with reading(worker_engine(part.url)) as conn:
        return _verify_slice(conn, part)


def _verify_slice(conn: Connection, part: ReceiptSlice) -> SliceResult:
    keys = receipt_keys(part.keys_dir)
    query = _filtered(select(c.id, c.receipt, c.amount, c.idempotency_key, c.jti, c.tool,
                             c.tenant, c.pricing_version, c.transfer_id),
                      part.start, part.end, part.filters).execution_options(yield_per=BATCH)
    result = SliceResult()
    for row in conn.execute(query):
        result.checked += 1
        if row.receipt is None:
            continue  # a captured call without a receipt: captured_call_incomplete says so
        try:
            claims = verify_receipt(row.receipt, keys).claims
        except BillingError as exc:
            result.add("receipt_invalid", Row("calls", row.id, exc.message), part.max_rows)
            continue
        differing = signed_differences(claims, row)
        if differing:
            result.add("receipt_mismatch", Row("calls", row.id, differing), part.max_rows)
    return result


def signed_differences(claims: dict[str, Any], row: Any) -> str:
    """The signed fields that disagree with the call row, as ``field: signed != row``."""
    expected = {"receiptId": row.id, "amount": str(row.amount),
                "idempotencyKey": row.idempotency_key, "jti": row.jti, "tool": row.tool,
                "pricingVersion": row.pricing_version}
    if "settlement" not in claims:  # a downstream payment's receipt names its own transaction
        expected["transaction"] = row.transfer_id
    if "tenant" in claims:
        expected["tenant"] = row.tenant
    return "; ".join(f"{name}: signed {claims.get(name)!r}, ledger {value!r}"
                     for name, value in expected.items() if claims.get(name) != value)
