"""Settlement of accepted x402 payments: through the official facilitator over HTTP, a
facilitator that is down, a settlement that fails after the tool ran (its output withheld),
and two replicas on one ledger given the same payment at once (one settles)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client import Client
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult
from sqlalchemy import Engine
from web3 import Web3

from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import KeySource
from mcpbill_cli.mcp import RECEIPT_META, Billing
from mcpbill_cli.mcp.x402 import PAYMENT_META, PAYMENT_RESPONSE_META
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier
from mcpbill_cli.x402.accept import Acceptor, Reserved
from mcpbill_cli.x402.settlers import FacilitatorSettler
from tests.wallet.devnet import free_port

from .accepting import (
    ACCEPT_PRICING,
    SEARCH_PRICE,
    Shop,
    balance,
    new_payer,
    official_client,
    official_payment,
    serve_facilitator,
    signed_payment,
    with_settler,
)
from .conftest import Peer
from .peer import NETWORK, V1_NETWORK


def call(server: MCPServer, tool: str, args: dict[str, Any],
         meta: dict[str, Any] | None = None) -> CallToolResult:
    async def run() -> CallToolResult:
        async with Client(server) as client:
            return await client.call_tool(tool, args, meta=meta)  # type: ignore[arg-type]

    return anyio.run(run)


def mcp_server(shop: Shop, search: Callable[[str], list[str]]) -> MCPServer:
    billing = Billing(shop.verifier, acceptor=shop.acceptor)
    server: MCPServer = MCPServer("paid", extensions=[billing])
    billing.tool(server, "search")(search)
    return server


def official(shop: Shop, payer: Any, *, version: int = 2) -> dict[str, Any]:
    challenge = shop.acceptor.payment_required("search", version=version)
    assert challenge is not None
    return official_payment(official_client(payer, shop.devnet.chain.usdc), challenge)


# --- through a facilitator -----------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 1])
def test_the_official_facilitator_settles_an_mcp_payment_once(
        shop: Shop, facilitator_url: str, version: int) -> None:
    shop = with_settler(shop, FacilitatorSettler(facilitator_url))
    runs: list[str] = []

    def search(q: str) -> list[str]:
        runs.append(q)
        return [q]

    server = mcp_server(shop, search)
    payer = new_payer(shop.devnet)
    payment = official(shop, payer, version=version)

    result = call(server, "search", {"q": "usdc"}, {PAYMENT_META: payment})
    again = call(server, "search", {"q": "usdc"}, {PAYMENT_META: payment})

    assert not result.is_error, result
    settlement = (result.meta or {})[PAYMENT_RESPONSE_META]
    assert settlement["network"] == (NETWORK if version == 2 else V1_NETWORK)
    receipt = shop.verifier.verify_receipt((result.meta or {})[RECEIPT_META]["jws"])
    assert receipt.claims["transaction"] == settlement["transaction"]
    assert not again.is_error and (again.meta or {})[PAYMENT_RESPONSE_META] == settlement
    assert runs == ["usdc"] and shop.received() == SEARCH_PRICE
    assert balance(shop.devnet, payer.address) == 1_000_000 - SEARCH_PRICE
    shop.assert_books_clean()


def test_a_facilitator_that_cannot_be_reached_refuses_before_the_tool_runs(
        shop: Shop, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    shop = with_settler(shop, FacilitatorSettler(f"http://127.0.0.1:{port}"))
    runs: list[str] = []
    server = mcp_server(shop, lambda q: runs.append(q) or [q])

    refused = call(server, "search", {"q": "x"},
                   {PAYMENT_META: official(shop, new_payer(shop.devnet))})

    assert refused.is_error and refused.structured_content is not None
    assert refused.structured_content["code"] == "X402_FACILITATOR_UNAVAILABLE"
    assert refused.structured_content["accepts"][0]["amount"] == str(SEARCH_PRICE)
    assert runs == [] and shop.received() == 0 and shop.payment_rows() == []
    # Where the operator's facilitator runs is the operator's: in the log, not the answer.
    assert str(port) not in refused.model_dump_json()
    assert any(f"127.0.0.1:{port}" in record.getMessage() for record in caplog.records)


def test_a_facilitator_gone_after_the_tool_ran_withholds_its_output_and_charges_nothing(
        shop: Shop, peer: Peer, fuji_anvil: str) -> None:
    served = serve_facilitator(peer, fuji_anvil)
    url = next(served)
    shop = with_settler(shop, FacilitatorSettler(url))

    def search(q: str) -> list[str]:
        served.close()  # the facilitator stops while the tool runs
        return ["the secret output"]

    server = mcp_server(shop, search)
    payer = new_payer(shop.devnet)

    result = call(server, "search", {"q": "x"}, {PAYMENT_META: official(shop, payer)})

    assert result.is_error and result.structured_content is not None
    assert "the secret output" not in str(result.model_dump())
    assert result.structured_content["code"] == "X402_FACILITATOR_UNAVAILABLE"
    assert url.split("//")[1] not in result.model_dump_json()  # the operator's facilitator
    assert [row.status for row in shop.payment_rows()] == ["failed"]
    assert shop.received() == 0 and shop.captured_calls() == []
    assert balance(shop.devnet, payer.address) == 1_000_000
    shop.assert_books_clean()


# --- a settlement that fails after the tool ran --------------------------------------------


def test_a_payer_who_spends_the_money_meanwhile_gets_no_output_and_pays_nothing(
        shop: Shop) -> None:
    payer = new_payer(shop.devnet, amount=SEARCH_PRICE)
    drain = signed_payment(payer, shop.terms, amount=SEARCH_PRICE,
                           to=Web3.to_checksum_address(shop.devnet.stranger))

    def search(q: str) -> list[str]:  # meanwhile the payer's other authorization lands first
        tx = shop.devnet.usdc.functions.transferWithAuthorization(
            *_transfer_args(drain)).transact({"from": shop.devnet.deployer, "gas": 200_000})
        assert shop.devnet.w3.eth.wait_for_transaction_receipt(tx)["status"] == 1
        return ["the secret output"]

    server = mcp_server(shop, search)

    result = call(server, "search", {"q": "x"}, {PAYMENT_META: official(shop, payer)})

    assert result.is_error and result.structured_content is not None
    assert result.structured_content["code"] == "X402_SETTLEMENT_FAILED"
    assert "the secret output" not in str(result.model_dump())
    assert "accepts" in result.structured_content
    assert [row.status for row in shop.payment_rows()] == ["failed"]
    assert shop.received() == 0 and shop.captured_calls() == []
    shop.assert_books_clean()


def _transfer_args(payment: dict[str, Any]) -> list[Any]:
    auth = payment["payload"]["authorization"]
    signature = bytes.fromhex(payment["payload"]["signature"][2:])
    return [auth["from"], auth["to"], int(auth["value"]), int(auth["validAfter"]),
            int(auth["validBefore"]), bytes.fromhex(auth["nonce"][2:]), signature[64],
            signature[:32], signature[32:64]]


@dataclass
class Pretender:
    """A facilitator that settles nothing: it answers every settlement with success and the
    hash of a transaction it did not make for this payment (``answer``)."""

    answer: str
    name: str = "pretender"

    def verify(self, signed: Any, requirement: Any) -> None:
        """Every payment looks fine to it."""

    def settle(self, signed: Any, requirement: Any) -> str:
        return self.answer


@pytest.mark.parametrize("answer", ["another payer's payment", "a transaction moving no USDC"])
def test_a_facilitator_answering_with_a_transaction_that_did_not_pay_gets_no_output(
        shop: Shop, answer: str) -> None:
    """The chain, not the facilitator's word, says whether the payer paid: the transfer must be
    this payer's, of the price, to the deposit address. The output is withheld and the payment
    is left to recovery (the facilitator holds the authorization and may still settle it),
    which releases it once it lapses unused. The authorization lives 3 s here."""
    honest = mcp_server(shop, lambda q: [q])
    first = call(honest, "search", {"q": "paid"}, {PAYMENT_META: official(shop, new_payer(
        shop.devnet))})
    if answer == "another payer's payment":
        transaction = (first.meta or {})[PAYMENT_RESPONSE_META]["transaction"]
    else:
        w3 = shop.devnet.w3
        transaction = Web3.to_hex(w3.eth.send_transaction(
            {"from": shop.devnet.deployer, "to": Web3.to_checksum_address(shop.pay_to),
             "value": 1}))
        assert w3.eth.wait_for_transaction_receipt(transaction)["status"] == 1
    pretending = with_settler(shop, Pretender(transaction))
    pretending.acceptor.settle_margin = 1
    runs: list[str] = []
    server = mcp_server(pretending, lambda q: runs.append(q) or ["the secret output"])
    payer = new_payer(shop.devnet)
    lapses = int(time.time()) + 3
    payment = signed_payment(payer, shop.terms, amount=SEARCH_PRICE, valid_before=lapses)

    result = call(server, "search", {"q": "x"}, {PAYMENT_META: payment})

    assert runs == ["x"] and result.is_error and result.structured_content is not None
    assert result.structured_content["code"] == "X402_SETTLEMENT_FAILED"
    assert "the secret output" not in str(result.model_dump())
    assert transaction in result.structured_content["message"]
    assert shop.received() == SEARCH_PRICE and len(shop.captured_calls()) == 1  # the first
    assert balance(shop.devnet, payer.address) == 1_000_000
    assert [row.status for row in shop.payment_rows()] == ["settled", "reserved"]
    assert pretending.acceptor.recover(older_than=0) == []  # it may still settle: left
    time.sleep(max(0.0, lapses + 1 - time.time()))
    assert len(pretending.acceptor.recover(older_than=0)) == 1
    assert [row.status for row in shop.payment_rows()] == ["settled", "released"]
    assert shop.received() == SEARCH_PRICE and balance(shop.devnet, payer.address) == 1_000_000
    shop.assert_books_clean()


# --- two replicas, one ledger --------------------------------------------------------------


def test_two_replicas_given_one_payment_at_once_settle_it_once(
        shop: Shop, pg_engine: Engine, keys_dir: Path) -> None:
    replicas = []
    for _ in range(2):
        verifier = Verifier(keys=KeySource(directory=keys_dir), engine=pg_engine,
                            pricing=PricingTable.from_document(ACCEPT_PRICING))
        a = shop.acceptor
        replicas.append(Acceptor(verifier, chain=a.chain, pay_to=a.pay_to, rpc=a.rpc,
                                 settler=a.settler))
    payer = new_payer(shop.devnet)
    payment = signed_payment(payer, shop.terms, amount=SEARCH_PRICE)
    both = threading.Barrier(2)
    outcomes: list[Any] = [None, None]

    def replica(n: int, args: dict[str, Any]) -> None:
        acceptor = replicas[n]
        try:
            verified = acceptor.verify(payment, "search", args=args)
            both.wait()
            opened = acceptor.reserve(verified)
            assert isinstance(opened, Reserved)
            settlement = acceptor.settle(opened)
            outcomes[n] = acceptor.record(opened, settlement, result='{"r": 1}')
        except BillingError as error:
            outcomes[n] = error

    threads = [threading.Thread(target=replica, args=(n, {"q": str(n)})) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    refused = [o for o in outcomes if isinstance(o, BillingError)]
    assert len(refused) == 1 and refused[0].code in ("X402_NONCE_USED", "CALL_IN_PROGRESS")
    assert shop.received() == SEARCH_PRICE
    assert balance(shop.devnet, payer.address) == 1_000_000 - SEARCH_PRICE
    pg_shop = Shop(replicas[0], replicas[0].verifier, pg_engine, shop.devnet, shop.pay_to,
                   keys_dir)
    assert [row.status for row in pg_shop.payment_rows()] == ["settled"]
    assert len(pg_shop.captured_calls("search")) == 1
    pg_shop.assert_books_clean()
    for r in replicas:
        r.verifier.close()
