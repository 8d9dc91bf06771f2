"""examples/paid_http.py as its operator runs it: the sample home's prices, real HTTP."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from sqlalchemy import Engine

from mcpbill_cli.clock import utcnow
from mcpbill_cli.config import Settings, load_settings
from mcpbill_cli.http import RECEIPT_HEADER, TOKEN_HEADER
from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger import credit
from mcpbill_cli.ledger.engine import writing
from mcpbill_cli.setup import initialize
from mcpbill_cli.verifier import Verifier

from .conftest import Switch, assert_ledger_sound

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "paid_http.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("paid_http_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def home(isolated_home: Path, db_url: str, engine: Engine) -> Settings:
    settings = load_settings(home=isolated_home, db_url=db_url, mode="demo")
    initialize(settings, alg="EdDSA", mode="demo", force=False)
    with writing(engine) as conn:
        credit.fund_demo(conn, "default", 1_000_000, now=utcnow())
    return settings


@pytest.fixture
def example(served: tuple[Switch, str], home: Settings,
            engine: Engine) -> Iterator[tuple[httpx.Client, Verifier, str]]:
    verifier = Verifier.from_settings(home, engine=engine)
    request = credit.IssueRequest(tenant="default", agent="agent-1", limit=50_000, ttl=3600,
                                  scope=None, audience=home.audience, issuer=home.issuer,
                                  demo=True)
    with writing(engine) as conn:
        token = credit.issue(conn, request, signer=KeyRing.load(home.keys_dir).signing_key(),
                             ttl_cap=home.ttl_cap, now=utcnow()).token
    switch, url = served
    switch.app = load_example().build_app(verifier)
    with httpx.Client(base_url=url, timeout=30) as http:
        yield http, verifier, token
    switch.app = None
    verifier.close()


def test_the_example_bills_search_and_summarize_and_serves_status_free(
        example: tuple[httpx.Client, Verifier, str], engine: Engine) -> None:
    http, verifier, token = example
    assert http.get("/status").json() == {"status": "ok"}
    found = http.post("/search", json={"q": "usdc"}, headers={TOKEN_HEADER: token})
    assert found.json()["results"][0] == "usdc: result 1"
    assert verifier.verify_receipt(found.headers[RECEIPT_HEADER]).amount == 2_000
    summary = http.post("/summarize", json={"text": "a b c"}, headers={TOKEN_HEADER: token})
    assert verifier.verify_receipt(summary.headers[RECEIPT_HEADER]).amount == 30
    empty = http.post("/search", json={"q": " "}, headers={TOKEN_HEADER: token})
    assert empty.status_code == 400 and RECEIPT_HEADER not in empty.headers
    assert http.post("/search", json={"q": "usdc2"}).status_code == 401
    assert_ledger_sound(engine)
