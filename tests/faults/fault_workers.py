"""Worker processes for the fault tests (started with the ``spawn`` context).

Each builds its own live-mode Verifier from the database URL, as a server replica does, and
makes paid calls until told to stop, keeping what a caller would see of each: a receipt, a
refusal's code, or anything else (which must never happen).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import KeySource
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier

RETRY_PAUSE = 0.05  # seconds between tries of a call refused as LEDGER_UNAVAILABLE


def paid_calls_until_stopped(db_url: str, keys_dir: str, pricing_doc: dict[str, Any],
                             token: str, worker: int, ready: Any, stop: Any,
                             results: Any) -> None:
    """Charge (odd workers) or hold, run the tool, capture (even workers), each call under
    its own idempotency key, retried under that key while it is LEDGER_UNAVAILABLE.

    Puts a dict: ``outcomes`` (code -> count), ``receipts`` ((key, receipt id) of calls that
    completed), ``tool_runs`` (hold ids the tool ran under), ``successes`` (wall-clock times
    of completed calls) and ``unexpected`` (tracebacks of anything that was not a
    BillingError, in the calls or in the verifier's threads).
    """
    unexpected: list[str] = []
    threading.excepthook = lambda args: unexpected.append(
        "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))
    verifier = Verifier(keys=KeySource(directory=Path(keys_dir)),
                        pricing=PricingTable.from_document(pricing_doc), db_url=db_url,
                        hold_timeout=5)
    outcomes: Counter[str] = Counter()
    receipts: list[tuple[str, str]] = []
    tool_runs: list[str] = []
    successes: list[float] = []
    try:
        verifier.preflight(token, "search")  # decode the token and open a connection first
        ready.put(worker)
        n = 0
        while not stop.is_set():
            key = f"fault-{worker}-{n}"
            try:
                receipt_id = _one_call(verifier, token, worker, key, n, tool_runs)
            except BillingError as exc:
                outcomes[exc.code] += 1
                if exc.code == "LEDGER_UNAVAILABLE":
                    time.sleep(RETRY_PAUSE)
                    continue  # the same call again, under the same key
            except Exception:  # noqa: BLE001 - what must never happen is recorded, not raised
                unexpected.append(traceback.format_exc())
            else:
                outcomes["ok"] += 1
                receipts.append((key, receipt_id))
                successes.append(time.time())
            n += 1
    finally:
        verifier.close()
    results.put({"worker": worker, "outcomes": dict(outcomes), "receipts": receipts,
                 "tool_runs": tool_runs, "successes": successes, "unexpected": unexpected})


def _one_call(verifier: Verifier, token: str, worker: int, key: str, n: int,
              tool_runs: list[str]) -> str:
    args = {"worker": worker, "n": n}
    if worker % 2:
        return verifier.charge(token, "search", args=args, idempotency_key=key).receipt_id
    with verifier.call(token, "search", args=args, idempotency_key=key) as call:
        tool_runs.append(call.hold.id)  # the tool runs here, under this hold
    assert call.receipt is not None  # noqa: S101 - call() captured or raised
    return call.receipt.receipt_id
