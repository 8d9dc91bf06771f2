"""Worker processes for the verifier tests (started with the ``spawn`` context).

Each builds its own Verifier from the database URL, the keys directory and the pricing
document: engines and connections cannot cross a process boundary.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import KeySource
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier


def _verifier(db_url: str, keys_dir: str, pricing_doc: dict[str, Any]) -> Verifier:
    return Verifier(keys=KeySource(directory=Path(keys_dir)),
                    pricing=PricingTable.from_document(pricing_doc), db_url=db_url)


def charge_calls(db_url: str, keys_dir: str, pricing_doc: dict[str, Any], token: str,
                 calls: int, ready: Any, go: Any, results: Any) -> None:
    """Make ``calls`` charges of ``search`` once ``go`` is set; put (outcomes, receipts)."""
    verifier = _verifier(db_url, keys_dir, pricing_doc)
    try:
        verifier.preflight(token, "status")  # decode the token and open a connection first
        ready.put("ready")
        go.wait(120)
        outcomes: Counter[str] = Counter()
        receipts: list[str] = []
        for n in range(calls):
            try:
                receipts.append(verifier.charge(token, "search",
                                                args={"pid": os.getpid(), "n": n}).jws)
                outcomes["ok"] += 1
            except BillingError as exc:
                outcomes[exc.code] += 1
        results.put((dict(outcomes), receipts))
    finally:
        verifier.close()


def charge_until_killed(db_url: str, keys_dir: str, pricing_doc: dict[str, Any],
                        token: str, progress: Any) -> None:
    """Charge ``search`` in a tight loop, reporting each success, until SIGKILL arrives."""
    verifier = _verifier(db_url, keys_dir, pricing_doc)
    done = 0
    while True:
        verifier.charge(token, "search", args={"n": done})
        done += 1
        if done % 5 == 0:
            progress.put(done)


def refund_calls(db_url: str, keys_dir: str, pricing_doc: dict[str, Any], receipt_id: str,
                 amount: int, refunds: int, ready: Any, go: Any, results: Any) -> None:
    """Ask ``refunds`` refunds of ``amount`` of one call once ``go`` is set; put (outcomes,
    refund receipts)."""
    verifier = _verifier(db_url, keys_dir, pricing_doc)
    try:
        verifier.receipt_for(receipt_id)  # open a connection first
        ready.put("ready")
        go.wait(120)
        outcomes: Counter[str] = Counter()
        receipts: list[str] = []
        for _ in range(refunds):
            try:
                receipts.append(verifier.refund(receipt_id, amount).jws)
                outcomes["ok"] += 1
            except BillingError as exc:
                outcomes[exc.code] += 1
        results.put((dict(outcomes), receipts))
    finally:
        verifier.close()
