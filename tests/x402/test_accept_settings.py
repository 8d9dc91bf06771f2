"""x402 acceptance configured the way an operator does it: ``mcpbill init``'s home,
``[x402]`` in pricing.toml, the chain and deposit address in config.toml, the keystore of
``wallet create`` paying the gas; ``Billing.from_settings()`` picks it all up."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio
import pytest
import tomli_w
from mcp.client import Client
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult
from web3 import Web3

from mcpbill_cli.config import Settings, load_settings
from mcpbill_cli.mcp import RECEIPT_META, Billing
from mcpbill_cli.mcp.x402 import PAYMENT_META, PAYMENT_RESPONSE_META
from mcpbill_cli.setup import initialize
from mcpbill_cli.wallet.keystore import ENV_KEYSTORE_PASSWORD, create_keystore, keystore_path
from mcpbill_cli.x402.accept import Acceptor, Unavailable

from .accepting import ACCEPT_PRICING, SEARCH_PRICE, balance, new_payer, official_client
from .accepting import official_payment as signed_by
from .conftest import Peer

PASSWORD = "correct horse battery staple"  # noqa: S105 - a test keystore's password


def live_home(home: Path, db_url: str, peer: Peer, rpc_url: str, *,
              deposit_address: str | None) -> Settings:
    settings = load_settings(home=home, db_url=db_url, mode="live")
    initialize(settings, alg="EdDSA", mode="live", force=False)
    chain = peer.devnet.chain
    config: dict[str, Any] = {
        "mode": "live", "db_url": db_url,
        "wallet": {"chain": "fuji"},
        "chains": {"fuji": {"caip2": chain.caip2, "usdc": chain.usdc, "rpc_url": rpc_url,
                            "eip712_name": chain.eip712_name, "confirmations": 1}}}
    if deposit_address is not None:
        config["wallet"]["deposit_address"] = deposit_address
    settings.config_path.write_text(tomli_w.dumps(config))
    settings.pricing_path.write_text(tomli_w.dumps(ACCEPT_PRICING))
    return load_settings(home=home, db_url=db_url)


def call(server: MCPServer, meta: dict[str, Any] | None = None) -> CallToolResult:
    async def run() -> CallToolResult:
        async with Client(server) as client:
            return await client.call_tool("search", {"q": "x"}, meta=meta)  # type: ignore[arg-type]

    return anyio.run(run)


def test_a_configured_home_takes_x402_payments_settled_from_its_keystore(
        isolated_home: Path, db_url: str, peer: Peer, fuji_anvil: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from eth_account import Account

    pay_to = Account.create().address.lower()
    settings = live_home(isolated_home, db_url, peer, fuji_anvil, deposit_address=pay_to)
    operator = create_keystore(keystore_path(settings.keys_dir), PASSWORD, iterations=2)
    w3 = peer.devnet.w3
    w3.eth.wait_for_transaction_receipt(w3.eth.send_transaction(
        {"from": peer.devnet.deployer, "to": Web3.to_checksum_address(operator),
         "value": 10**19}))
    monkeypatch.setenv(ENV_KEYSTORE_PASSWORD, PASSWORD)
    billing = Billing.from_settings(settings)
    try:
        assert billing.acceptor is not None
        server: MCPServer = MCPServer("paid", extensions=[billing])
        billing.tool(server, "search")(lambda q: [q])
        challenge = billing.acceptor.payment_required("search")
        assert challenge is not None
        payer = new_payer(peer.devnet)
        payment = signed_by(official_client(payer, peer.devnet.chain.usdc), challenge)

        result = call(server, {PAYMENT_META: payment})

        assert not result.is_error, result
        assert (result.meta or {})[PAYMENT_RESPONSE_META]["success"] is True
        assert RECEIPT_META in (result.meta or {})
        assert balance(peer.devnet, pay_to) == SEARCH_PRICE
    finally:
        if billing.acceptor is not None:
            billing.acceptor.close()  # its recovery thread
        billing.verifier.close()


def test_a_home_without_a_deposit_address_offers_no_x402_and_says_why(
        isolated_home: Path, db_url: str, peer: Peer, fuji_anvil: str,
        caplog: pytest.LogCaptureFixture) -> None:
    settings = live_home(isolated_home, db_url, peer, fuji_anvil, deposit_address=None)
    caplog.set_level(logging.WARNING, logger="mcpbill")

    billing = Billing.from_settings(settings)
    try:
        assert billing.acceptor is None
        unavailable = Acceptor.from_settings(billing.verifier, settings)
        assert isinstance(unavailable, Unavailable)
        assert "deposit address" in unavailable.reason
        assert any("x402 payments are not offered" in r.getMessage() for r in caplog.records)
        server: MCPServer = MCPServer("paid", extensions=[billing])
        billing.tool(server, "search")(lambda q: [q])
        refused = call(server)
        assert refused.is_error and refused.structured_content is not None
        assert refused.structured_content["code"] == "INVALID_CREDIT_TOKEN"
        assert "accepts" not in refused.structured_content
    finally:
        billing.verifier.close()
