"""``Authorization: Bearer`` over streamable HTTP, as MCP's authorization spec has it: ignored
unless mcpbill is configured as the server's authorization (``[mcp]`` in config.toml), and then
only for tokens issued to the server's canonical URI (RFC 8707 audience).

The operator's side is the CLI (``token issue --audience``); the agent's is the official MCP
client over real HTTP; the ledger shows what was billed."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import anyio
import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult
from sqlalchemy import Engine
from typer.testing import CliRunner

from mcpbill_cli.cli import app
from mcpbill_cli.clock import utcnow
from mcpbill_cli.config import Settings, load_settings
from mcpbill_cli.ledger import credit
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.mcp import EXTENSION_ID, TOKEN_META, Billing
from mcpbill_cli.verifier import Verifier

from .conftest import load_example, receipt_of, refusal_of, serve, usd

RESOURCE = "https://mcp.example.com/mcp"


async def call(url: str, headers: dict[str, str], meta: dict[str, Any] | None = None
               ) -> CallToolResult:
    async with httpx2.AsyncClient(headers=headers) as web, \
            Client(streamable_http_client(url, http_client=web)) as client:
        return await client.call_tool("search", {"q": "x"}, meta=meta)  # type: ignore[arg-type]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def issue(home: Settings, audience: str | None = None) -> str:
    """``mcpbill token issue --limit 0.05 [--audience A]``: the JWT it prints."""
    extra = ["--audience", audience] if audience is not None else []
    result = CliRunner().invoke(app, ["token", "issue", "--limit", "0.05", *extra],
                                env={"MCPBILL_DB_URL": home.db_url}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def payload(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


def spent(engine: Engine, token: str) -> int:
    with reading(engine) as conn:
        return credit.show(conn, payload(token)["jti"], now=utcnow()).spent


@pytest.fixture
def authorized(home: Settings) -> Settings:
    """The home, configured with mcpbill as its MCP server's authorization."""
    with home.config_path.open("a") as config:
        config.write(f'\n[mcp]\nauthorization = "bearer"\nresource = "{RESOURCE}"\n')
    return load_settings(home=home.home, db_url=home.db_url)


@pytest.fixture
def authorized_url(authorized: Settings) -> Iterator[str]:
    """The example server, billed as ``Billing.from_settings`` configures it, over HTTP."""
    billing = Billing.from_settings(authorized)
    try:
        with serve(load_example().build_server(billing).streamable_http_app()) as url:
            yield url
    finally:
        billing.verifier.close()


# --- by default: the header is someone else's ----------------------------------------------------


def test_by_default_a_call_with_only_a_bearer_token_is_refused_as_missing_a_token(
        http_url: str, home: Settings, engine: Engine) -> None:
    token = issue(home)
    error = refusal_of(anyio.run(call, http_url, bearer(token)))
    assert (error["code"], error["reason"]) == ("INVALID_CREDIT_TOKEN", "missing")
    assert "Authorization" not in error["message"]
    assert spent(engine, token) == 0


def test_by_default_the_token_in_meta_is_billed_whatever_the_header_holds(
        http_url: str, home: Settings, engine: Engine) -> None:
    header, sent = issue(home), issue(home)
    receipt = receipt_of(anyio.run(call, http_url, bearer(header), {TOKEN_META: sent}))
    assert receipt["jti"] == payload(sent)["jti"]
    assert (spent(engine, sent), spent(engine, header)) == (usd("0.002"), 0)


# --- configured: mcpbill is the server's authorization -------------------------------------------


def test_a_bearer_token_issued_to_the_servers_canonical_uri_is_billed(
        authorized_url: str, authorized: Settings, engine: Engine) -> None:
    token = issue(authorized, audience=RESOURCE)
    assert payload(token)["aud"] == RESOURCE
    receipt = receipt_of(anyio.run(call, authorized_url, bearer(token)))
    assert receipt["jti"] == payload(token)["jti"]
    assert spent(engine, token) == usd("0.002")


@pytest.mark.parametrize("audience", [None, "https://other.example.com/mcp",
                                      "https://mcp.example.com/mcp/other"],
                         ids=["config-audience", "another-server", "another-path"])
def test_a_bearer_token_issued_to_anyone_else_is_refused(
        authorized_url: str, authorized: Settings, engine: Engine, audience: str | None) -> None:
    token = issue(authorized, audience=audience)
    error = refusal_of(anyio.run(call, authorized_url, bearer(token)))
    assert (error["code"], error["reason"]) == ("INVALID_CREDIT_TOKEN", "wrong_audience")
    assert RESOURCE in error["message"]
    assert spent(engine, token) == 0


def test_a_bearer_token_whose_audience_was_rewritten_is_refused(
        authorized_url: str, authorized: Settings, engine: Engine) -> None:
    """The audience is read before the signature is checked; the signature covers it."""
    token = issue(authorized)
    head, body, signature = token.split(".")
    claims = {**payload(token), "aud": RESOURCE}
    forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    forged = f"{head}.{forged_body}.{signature}"
    error = refusal_of(anyio.run(call, authorized_url, bearer(forged)))
    assert (error["code"], error["reason"]) == ("INVALID_CREDIT_TOKEN", "bad_signature")
    assert spent(engine, token) == 0


def test_configured_a_token_in_meta_still_works_and_wins(
        authorized_url: str, authorized: Settings, engine: Engine) -> None:
    header, sent = issue(authorized, audience=RESOURCE), issue(authorized)
    receipt = receipt_of(anyio.run(call, authorized_url, bearer(header), {TOKEN_META: sent}))
    assert receipt["jti"] == payload(sent)["jti"]
    assert spent(engine, header) == 0


def test_configured_a_call_without_any_token_says_both_places(authorized_url: str) -> None:
    error = refusal_of(anyio.run(call, authorized_url, {}))
    assert error["reason"] == "missing" and "Authorization: Bearer" in error["message"]


def test_the_extension_advertises_the_canonical_uri(authorized_url: str) -> None:
    async def capabilities() -> Any:
        async with httpx2.AsyncClient() as web, \
                Client(streamable_http_client(authorized_url, http_client=web)) as client:
            return client.server_capabilities

    advertised = anyio.run(capabilities).extensions[EXTENSION_ID]
    assert advertised["authorization"] == {"bearer": True, "resource": RESOURCE}


# --- the API -------------------------------------------------------------------------------------


def test_a_resource_the_verifier_would_refuse_is_an_error_at_construction(
        verifier: Verifier) -> None:
    with pytest.raises(ValueError, match="does not accept tokens issued to"):
        Billing(verifier, resource=RESOURCE)


def test_bearer_true_is_deprecated_and_still_reads_tokens_of_the_verifiers_audience(
        verifier: Verifier, home: Settings, engine: Engine) -> None:
    with pytest.warns(DeprecationWarning, match="resource="):
        billing = Billing(verifier, bearer=True)
    token = issue(home)
    with serve(load_example().build_server(billing).streamable_http_app()) as url:
        receipt_of(anyio.run(call, url, bearer(token)))
    assert spent(engine, token) == usd("0.002")


def test_bearer_false_is_deprecated_and_means_the_default(verifier: Verifier) -> None:
    with pytest.warns(DeprecationWarning):
        assert Billing(verifier, bearer=False).resource is None
