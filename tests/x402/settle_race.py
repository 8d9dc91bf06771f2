"""One replica settling one x402 payment from the operator's shared keystore, made to race
another: it reads its transaction nonce, waits until every racer has read theirs, then sends.

    python -m tests.x402.settle_race HOME DB_URL PAYMENT_JSON_FILE BARRIER_DIR RACERS OUT_FILE

``OUT_FILE`` gets ``{"transaction": ..., "receipt": ...}``, or ``{"error": CODE}``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from mcpbill_cli.config import load_settings
from mcpbill_cli.errors import BillingError
from mcpbill_cli.verifier import Verifier
from mcpbill_cli.x402.accept import Acceptor, Reserved


def racing(read_nonce: Any, barrier: Path, racers: int) -> Any:
    """``read_nonce`` whose first call returns only once ``racers`` processes made theirs."""
    first = [True]

    def read(*args: Any, **kwargs: Any) -> Any:
        nonce = read_nonce(*args, **kwargs)
        if first[0]:
            first[0] = False
            (barrier / f"ready-{id(first)}-{time.monotonic_ns()}").touch()
            deadline = time.monotonic() + 60
            while len(list(barrier.iterdir())) < racers and time.monotonic() < deadline:
                time.sleep(0.01)
        return nonce

    return read


def main() -> None:
    home, db_url, payment_file, barrier, racers, out = sys.argv[1:7]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    settings = load_settings(home=Path(home), db_url=db_url)
    verifier = Verifier.from_settings(settings)
    acceptor = Acceptor.from_settings(verifier, settings, recover=False)
    assert isinstance(acceptor, Acceptor), acceptor
    eth = acceptor.rpc.w3.eth
    eth.get_transaction_count = racing(eth.get_transaction_count,  # type: ignore[method-assign]
                                       Path(barrier), int(racers))
    try:
        opened = acceptor.reserve(acceptor.verify(json.loads(Path(payment_file).read_text()),
                                                  "search"))
        assert isinstance(opened, Reserved)
        settlement = acceptor.settle(opened)
        receipt = acceptor.record(opened, settlement)
        answer = {"transaction": settlement.transaction, "receipt": receipt.receipt_id}
    except BillingError as error:
        answer = {"error": error.code, "message": error.message}
    finally:
        verifier.close()
    Path(out).write_text(json.dumps(answer))


if __name__ == "__main__":
    main()
