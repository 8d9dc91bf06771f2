"""`x402 fetch` fails on HTTP errors as `curl --fail` does: X402_HTTP_ERROR (exit 26) with the
status, and the error page never on stdout."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from eth_account import Account

from tests.cli.conftest import Invoke, error_json, ok_json

PASSWORD = "correct horse battery staple"  # noqa: S105 - a test keystore's password
PAGES = {"/ok": (200, b"the report"), "/broken": (501, b"not implemented here"),
         "/missing": (404, b"no such report")}


class Pages(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        status, body = PAGES[self.path]
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        """Quiet: the test reads the CLI's output, not the server's log."""


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def token(ledger_cli: Invoke, isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A 1 USDC token, and the operator keystore a paying fetch opens."""
    keystore = Account.encrypt(Account.create().key, PASSWORD, iterations=2**4)
    (isolated_home / "keys" / "wallet.json").write_text(json.dumps(keystore))
    monkeypatch.setenv("MCPBILL_KEYSTORE_PASSWORD", PASSWORD)
    ok_json(ledger_cli("wallet", "fund", "--demo", "2", "--json"))
    token: str = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))["token"]
    return token


@pytest.mark.parametrize(("path", "status", "dry_run"), [
    ("/broken", 501, False), ("/missing", 404, False), ("/broken", 501, True)])
def test_an_http_error_is_x402_http_error(ledger_cli: Invoke, server: str, token: str,
                                          path: str, status: int, dry_run: bool) -> None:
    args = ["x402", "fetch", server + path, "--token", token] + (["--dry-run"] if dry_run else [])
    as_json = ledger_cli(*args, "--json")
    assert as_json.exit_code == 26, as_json.output
    error = error_json(as_json, "X402_HTTP_ERROR")
    assert error["status"] == status and error["url"] == server + path
    assert error["body_excerpt"] == PAGES[path][1].decode() and error["receipt_id"] is None
    assert token not in as_json.output
    as_text = ledger_cli(*args)
    assert as_text.exit_code == 26, as_text.output
    assert as_text.stdout == "" and f"HTTP {status}" in as_text.stderr
    remaining = ok_json(ledger_cli("token", "list", "--json"))[0]["remaining_usd"]
    assert remaining == "1.00"


def test_a_success_still_prints_the_body(ledger_cli: Invoke, server: str, token: str) -> None:
    result = ledger_cli("x402", "fetch", server + "/ok", "--token", token)
    assert result.exit_code == 0, result.output
    assert result.stdout == "the report"
