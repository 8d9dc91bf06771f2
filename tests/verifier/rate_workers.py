"""Worker processes for the rate limit tests (started with the ``spawn`` context).

Each builds its own Verifier on the shared ledger, at one fixed moment (``at``, ISO 8601), so
that every call of the burst falls in one window whatever the machine's load.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import KeySource
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier

from .billing_support import FakeClock


def burst(db_url: str, keys_dir: str, pricing_doc: dict[str, Any], token: str, at: str,
          calls: int, ready: Any, go: Any, results: Any,
          limits_storage: str | None = None) -> None:
    """Make ``calls`` charges of ``search`` once ``go`` is set; put the outcomes by code."""
    verifier = Verifier(keys=KeySource(directory=Path(keys_dir)),
                        pricing=PricingTable.from_document(pricing_doc), db_url=db_url,
                        clock=FakeClock(datetime.fromisoformat(at)),
                        **({"limits_storage": limits_storage} if limits_storage else {}))
    try:
        verifier.preflight(token, "status")  # decode the token and open a connection first
        ready.put("ready")
        go.wait(120)
        outcomes: Counter[str] = Counter()
        for n in range(calls):
            try:
                verifier.charge(token, "search", args={"pid": os.getpid(), "n": n})
                outcomes["ok"] += 1
            except BillingError as exc:
                outcomes[exc.code] += 1
        results.put(dict(outcomes))
    finally:
        verifier.close()
