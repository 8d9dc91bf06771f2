"""`mcpbill status`: every part of a home reported, and an exit code a script can test."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from sqlalchemy import make_url, text

from mcpbill_cli import Verifier
from mcpbill_cli.ledger.engine import make_engine
from mcpbill_cli.ledger.models import SCHEMA_REVISION
from tests.cli.conftest import Invoke, ok_json
from tests.cli.test_startup import heavy_imports
from tests.conftest import PG_ADMIN_URL

BASE_CHAIN_ID = 8453


def status_document(cli: Invoke, *args: str, code: int) -> dict:
    result = cli(*args, "status", "--json")
    assert result.exit_code == code, result.output
    document: dict = json.loads(result.stdout)
    assert document["status"] == ("ok" if code == 0 else "error")
    return document


def test_an_initialized_home_is_all_good(ledger_cli: Invoke, db_url: str) -> None:
    data = status_document(ledger_cli, code=0)["data"]
    assert data["initialized"] is True
    assert data["ledger"]["schema"] == data["ledger"]["required"] == SCHEMA_REVISION
    assert data["ledger"]["pending_holds"] == 0
    assert (data["keys"]["alg"], data["keys"]["count"]) == ("EdDSA", 1)
    if db_url.startswith("postgresql"):  # the server's clock decides; here it is this host's
        assert data["ledger"]["clock"] == "database"
        assert abs(data["ledger"]["clock_offset_seconds"]) < 60
        assert data["ledger"]["clock_error_bound_seconds"] >= 0
    else:
        assert data["ledger"]["clock"] == "host"
        assert data["ledger"]["clock_offset_seconds"] is None
    assert data["pricing_version"] == 1
    assert data["chain"] == {"configured": False, "chain": "base", "rpc_url": None,
                             "reachable": None, "chain_id": None}


def test_pending_holds_are_counted(ledger_cli: Invoke) -> None:
    ok_json(ledger_cli("wallet", "fund", "--demo", "1", "--json"))
    token = ok_json(ledger_cli("token", "issue", "--limit", "1", "--json"))["token"]
    verifier = Verifier.from_settings()
    try:
        verifier.hold(token, "search", idempotency_key="held-1")
        data = status_document(ledger_cli, code=0)["data"]
    finally:
        verifier.close()
    assert data["ledger"]["pending_holds"] == 1


def test_a_mistyped_home_is_not_initialized_and_stays_missing(cli: Invoke,
                                                              tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    document = status_document(cli, "--home", str(missing), code=9)
    assert document["data"]["initialized"] is False
    assert document["errors"][0]["code"] == "NOT_INITIALIZED"
    assert str(missing) in document["errors"][0]["message"]
    assert not missing.exists()


def test_an_outdated_schema_exits_9(ledger_cli: Invoke, db_url: str) -> None:
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0005'"))
    engine.dispose()
    document = status_document(ledger_cli, code=9)
    assert [e["code"] for e in document["errors"]] == ["SCHEMA_OUTDATED"]
    assert document["data"]["ledger"]["schema"] == "0005"


def test_an_unreachable_ledger_exits_8_without_its_password(ledger_cli: Invoke) -> None:
    url = "postgresql+psycopg://ops:hunter2@127.0.0.1:1/ledger"
    result = ledger_cli("--db-url", url, "status", "--json")
    assert result.exit_code == 8, result.output
    document = json.loads(result.stdout)
    assert [e["code"] for e in document["errors"]] == ["LEDGER_UNAVAILABLE"]
    assert document["data"]["ledger"]["reachable"] is False
    assert document["data"]["keys"]["count"] == 1
    assert "hunter2" not in result.output


@pytest.mark.parametrize("command", [["status"], ["db", "status"], ["wallet", "balance"]])
def test_a_postgresql_database_not_there_is_unreachable_not_empty(
        cli: Invoke, command: list[str]) -> None:
    """PostgreSQL says "does not exist" of a missing table and of a missing database alike:
    `mcpbill init` cannot create a database, so the advice must be to check the URL."""
    assert cli("init").exit_code == 0
    url = make_url(PG_ADMIN_URL).set(database=f"mcpbill_absent_{os.getpid()}")
    result = cli("--db-url", url.render_as_string(hide_password=False), *command, "--json")
    assert result.exit_code == 8, result.output
    assert [e["code"] for e in json.loads(result.stdout)["errors"]] == ["LEDGER_UNAVAILABLE"]


class _ChainIdHandler(BaseHTTPRequestHandler):
    chain_id = BASE_CHAIN_ID

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        body = json.dumps({"jsonrpc": "2.0", "id": request["id"],
                           "result": hex(self.chain_id)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def rpc_server() -> Iterator[HTTPServer]:
    """A JSON-RPC endpoint on localhost answering eth_chainId (Base's unless changed)."""
    server = HTTPServer(("127.0.0.1", 0), type("Handler", (_ChainIdHandler,), {}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_a_signing_key_that_cannot_sign_exits_10(ledger_cli: Invoke, damage: str) -> None:
    """`status` answers for the key `token issue` signs with, not only for the ring's index."""
    key = next((Path(os.environ["MCPBILL_HOME"]) / "keys").glob("*.pem"))
    key.unlink()
    if damage == "garbage":
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    document = status_document(ledger_cli, code=10)
    assert [e["code"] for e in document["errors"]] == ["KEYRING_CORRUPT"]
    assert key.name in document["errors"][0]["message"]
    assert ledger_cli("token", "issue", "--limit", "1").exit_code == 10  # what status foretold


def test_a_configured_rpc_is_asked_for_its_chain(ledger_cli: Invoke,
                                                 rpc_server: HTTPServer) -> None:
    url = f"http://127.0.0.1:{rpc_server.server_port}/key-in-path"
    result = ledger_cli("status", "--rpc-url", url, "--json")
    assert result.exit_code == 0, result.output
    chain = json.loads(result.stdout)["data"]["chain"]
    assert chain == {"configured": True, "chain": "base", "reachable": True,
                     "chain_id": BASE_CHAIN_ID,
                     "rpc_url": f"http://127.0.0.1:{rpc_server.server_port}/***"}
    assert "key-in-path" not in result.output


def test_an_rpc_on_another_chain_exits_18(ledger_cli: Invoke, rpc_server: HTTPServer) -> None:
    rpc_server.RequestHandlerClass.chain_id = 1  # type: ignore[attr-defined]
    result = ledger_cli("status", "--rpc-url", f"http://127.0.0.1:{rpc_server.server_port}",
                        "--json")
    assert result.exit_code == 18, result.output
    assert [e["code"] for e in json.loads(result.stdout)["errors"]] == ["WRONG_CHAIN"]


def test_an_unreachable_rpc_exits_17(ledger_cli: Invoke, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCPBILL_RPC_URL", "http://127.0.0.1:1")
    result = ledger_cli("status", "--json")
    assert result.exit_code == 17, result.output
    document = json.loads(result.stdout)
    assert [e["code"] for e in document["errors"]] == ["RPC_UNAVAILABLE"]
    assert document["data"]["chain"]["reachable"] is False


def test_the_human_report_names_each_part(ledger_cli: Invoke) -> None:
    result = ledger_cli("status")
    assert result.exit_code == 0, result.output
    for part in ("home", "ledger", "schema", "pending holds", "clock", "signing key",
                 "pricing version", "chain"):
        assert part in result.stdout


def test_status_without_an_rpc_does_not_import_web3(ledger_cli: Invoke) -> None:
    assert heavy_imports("status", env=dict(os.environ)) == []
