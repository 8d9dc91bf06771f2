"""A billed app in a process of its own, for the crash test: ``GET /hang`` opens its call, says
so in ``marker``, then hangs until the process is killed.

    python -m tests.http.crash_server DB_URL KEYS_DIR PORT MARKER
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from mcpbill_cli.http import PaidRoute, PaymentMiddleware
from mcpbill_cli.keys import KeySource
from mcpbill_cli.ledger.engine import make_engine
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier
from tests.verifier.billing_support import PRICING_DOC


def main() -> None:
    db_url, keys_dir, port, marker = sys.argv[1:5]
    verifier = Verifier(keys=KeySource(directory=Path(keys_dir)),
                        pricing=PricingTable.from_document(PRICING_DOC),
                        engine=make_engine(db_url))
    app = FastAPI()
    app.add_middleware(PaymentMiddleware, verifier=verifier,
                       routes=[PaidRoute("GET", "/hang", "search")])

    @app.get("/hang")
    def hang() -> dict[str, bool]:
        Path(marker).touch()
        time.sleep(120)
        return {"finished": True}

    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")


if __name__ == "__main__":
    main()
