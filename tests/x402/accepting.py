"""The accepting side's test parts: a shop (a verifier with x402 on, an acceptor paid to a fresh
deposit address on the session's anvil), payers with test USDC, and the official x402 client
as the agent that signs payments from the shop's challenges."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import Engine, func, select, text
from web3 import Web3
from x402 import x402ClientSync
from x402.mechanisms.evm.exact import ExactEvmClientScheme
from x402.mechanisms.evm.exact.v1 import ExactEvmSchemeV1Client
from x402.schemas.helpers import parse_payment_required

from mcpbill_cli.clock import Clock, utcnow
from mcpbill_cli.keys import KeySource
from mcpbill_cli.ledger import invariants
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import calls, deposits, x402_payments
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.reconcile import ReconcileOptions, Window, reconcile
from mcpbill_cli.verifier import Verifier
from mcpbill_cli.wallet.eip3009 import AUTHORIZATION_TYPES
from mcpbill_cli.wallet.rpc import Rpc, connect
from mcpbill_cli.x402.accept import Acceptor
from mcpbill_cli.x402.offers import Terms
from mcpbill_cli.x402.settlers import SelfSettler, Settler
from tests.wallet.devnet import Devnet

from .conftest import Peer
from .peer import (
    CHAIN_ID,
    NETWORK,
    V1_NETWORK,
    ServedApp,
    facilitator_app,
    official_facilitator,
)

SEARCH_PRICE = 10_000  # 0.01 USDC
PAYER_FUNDS = 1_000_000  # 1 USDC
ACCEPT_PRICING: dict[str, Any] = {
    "version": 1,
    "x402": {"enabled": True, "max_timeout": "60s", "tenant": "x402"},
    "tools": {
        "search": {"price": "0.01"},
        "premium": {"price": "0.05", "x402": False},
        "summarize": {"price_per_unit": "0.00001", "max_price": "0.10"},
        "status": {"price": "0"},
        "boom": {"price": "0.01"},
    },
    "tenants": {"acme": {"discount_percent": 50}},
}


@dataclass
class Shop:
    """The accepting server's side: its acceptor, ledger, chain and deposit address."""

    acceptor: Acceptor
    verifier: Verifier
    engine: Engine
    devnet: Devnet
    pay_to: str
    keys_dir: Path

    @property
    def terms(self) -> Terms:
        return self.acceptor.terms()

    def received(self) -> int:
        """Micro-USDC held by the deposit address on chain."""
        return balance(self.devnet, self.pay_to)

    def payment_rows(self) -> list[Any]:
        with reading(self.engine) as conn:
            return list(conn.execute(select(x402_payments).order_by(x402_payments.c.reserved_at)))

    def captured_calls(self, tool: str | None = None) -> list[Any]:
        query = select(calls).where(calls.c.status == "captured")
        if tool is not None:
            query = query.where(calls.c.tool == tool)
        with reading(self.engine) as conn:
            return list(conn.execute(query))

    def deposit_count(self) -> int:
        with reading(self.engine) as conn:
            return int(conn.execute(select(func.count()).select_from(deposits)).scalar_one())

    def assert_books_clean(self) -> None:
        """The ledger's invariants hold and reconcile (receipts verified) finds nothing."""
        with reading(self.engine) as conn:
            assert invariants.check(conn) == []
        self.verifier.seal()
        now = utcnow()
        window = Window(now - timedelta(hours=1), now + timedelta(minutes=1))
        report = reconcile(self.engine, ReconcileOptions(
            window=window, keys_dir=self.keys_dir, verify_receipts=True,
            now=now + timedelta(minutes=2)))
        assert report.findings == (), report.findings


@pytest.fixture(scope="session")
def gas_account(peer: Peer) -> LocalAccount:
    """The operator's own account on anvil: it pays the gas of self-settlement."""
    account: LocalAccount = Account.create()
    w3 = peer.devnet.w3
    tx = w3.eth.send_transaction({"from": peer.devnet.deployer, "to": account.address,
                                  "value": 10**19})
    assert w3.eth.wait_for_transaction_receipt(tx)["status"] == 1
    return account


@pytest.fixture
def shop(engine: Engine, keys_dir: Path, peer: Peer, fuji_anvil: str,
         gas_account: LocalAccount) -> Iterator[Shop]:
    """A verifier with x402 on, paid to a fresh deposit address, settling by itself."""
    verifier = Verifier(keys=KeySource(directory=keys_dir),
                        pricing=PricingTable.from_document(ACCEPT_PRICING), engine=engine)
    chain = peer.devnet.chain
    pay_to = Account.create().address.lower()
    rpc = Rpc(connect(fuji_anvil))
    terms = Terms(NETWORK, chain.usdc, pay_to, chain.eip712_name, chain.eip712_version, 60)
    acceptor = Acceptor(verifier, chain=chain, pay_to=pay_to, rpc=rpc,
                        settler=SelfSettler(rpc, terms, lambda: gas_account))
    yield Shop(acceptor, verifier, engine, peer.devnet, pay_to, keys_dir)
    verifier.close()


@pytest.fixture(scope="session")
def facilitator_url(peer: Peer, fuji_anvil: str) -> Iterator[str]:
    """The official x402 facilitator (its own gas account) served over HTTP for the session."""
    yield from serve_facilitator(peer, fuji_anvil)


def serve_facilitator(peer: Peer, rpc_url: str) -> Iterator[str]:
    account: LocalAccount = Account.create()
    w3 = peer.devnet.w3
    tx = w3.eth.send_transaction({"from": peer.devnet.deployer, "to": account.address,
                                  "value": 10**19})
    assert w3.eth.wait_for_transaction_receipt(tx)["status"] == 1
    served = ServedApp(facilitator_app(official_facilitator(account.key.to_0x_hex(), rpc_url)))
    try:
        yield served.start()
    finally:
        served.stop()


def with_settler(shop: Shop, settler: Settler) -> Shop:
    """The same shop (ledger, chain, deposit address) settling through ``settler``."""
    a = shop.acceptor
    acceptor = Acceptor(a.verifier, chain=a.chain, pay_to=a.pay_to, rpc=a.rpc, settler=settler)
    return replace(shop, acceptor=acceptor)


@contextmanager
def rate_limited(shop: Shop, agent_calls: str, *, clock: Clock | None = None,
                 limits_storage: str | None = None) -> Iterator[Shop]:
    """The same shop (ledger, chain, deposit address, settler) with ``[limits] agent_calls``
    set: its own verifier (on ``clock``, counting in ``limits_storage``) and acceptor."""
    verifier = Verifier(keys=KeySource(directory=shop.keys_dir), engine=shop.engine,
                        pricing=PricingTable.from_document(
                            {**ACCEPT_PRICING, "limits": {"agent_calls": [agent_calls]}}),
                        clock=clock, limits_storage=limits_storage)
    a = shop.acceptor
    acceptor = Acceptor(verifier, chain=a.chain, pay_to=a.pay_to, rpc=a.rpc, settler=a.settler)
    try:
        yield replace(shop, acceptor=acceptor, verifier=verifier)
    finally:
        verifier.close()


def balance(devnet: Devnet, address: str) -> int:
    return int(devnet.usdc.functions.balanceOf(Web3.to_checksum_address(address)).call())


def new_payer(devnet: Devnet, amount: int = PAYER_FUNDS) -> LocalAccount:
    """A fresh account holding ``amount`` test USDC (and no ETH: it only signs)."""
    account: LocalAccount = Account.create()
    if amount:
        tx = devnet.usdc.functions.mint(account.address, amount).transact(
            {"from": devnet.deployer, "gas": 100_000})
        assert devnet.w3.eth.wait_for_transaction_receipt(tx)["status"] == 1
    return account


def official_client(payer: LocalAccount, asset: str) -> x402ClientSync:
    """The official x402 client, paying with ``payer``, allowed to pay the test USDC."""
    client = x402ClientSync()
    client.register(NETWORK, ExactEvmClientScheme(payer))
    client.register_v1(V1_NETWORK, ExactEvmSchemeV1Client(payer))
    client.set_spend_controls({"allowed_assets": [
        {"network": network, "asset": asset, "max_amount_per_payment": "1000000"}
        for network in (NETWORK, V1_NETWORK)]})
    return client


def official_payment(client: x402ClientSync, challenge: dict[str, Any]) -> dict[str, Any]:
    """What the official client sends for ``challenge``, as a JSON-ready mapping."""
    payload = client.create_payment_payload(parse_payment_required(challenge))
    return payload.model_dump(by_alias=True, exclude_none=True)


def signed_payment(payer: LocalAccount, terms: Terms, *, amount: int, to: str | None = None,
                   valid_after: int = 0, valid_before: int | None = None,
                   nonce: str | None = None, network: str = NETWORK) -> dict[str, Any]:
    """A v2 payment signed by ``payer`` exactly as asked (also for what the shop must refuse)."""
    nonce = nonce or "0x" + secrets.token_hex(32)
    to = to or terms.pay_to
    before = valid_before if valid_before is not None else int(time.time()) + 60
    message = {"from": payer.address, "to": Web3.to_checksum_address(to), "value": amount,
               "validAfter": valid_after, "validBefore": before, "nonce": bytes.fromhex(nonce[2:])}
    domain = {"name": terms.name, "version": terms.version, "chainId": CHAIN_ID,
              "verifyingContract": Web3.to_checksum_address(terms.asset)}
    signed = payer.sign_typed_data(domain_data=domain, message_types=AUTHORIZATION_TYPES,
                                   message_data=message)
    accepted = {"scheme": "exact", "network": network, "amount": str(amount),
                "asset": terms.asset, "payTo": to, "maxTimeoutSeconds": terms.max_timeout,
                "extra": {"name": terms.name, "version": terms.version}}
    authorization = {"from": payer.address, "to": Web3.to_checksum_address(to),
                     "value": str(amount), "validAfter": str(valid_after),
                     "validBefore": str(before), "nonce": nonce}
    return {"x402Version": 2, "accepted": accepted,
            "payload": {"signature": "0x" + bytes(signed.signature).hex(),
                        "authorization": authorization}}


# The connections that wait for the tables ``ledger_locked`` (tests/proxy/test_cut_off.py)
# holds on PostgreSQL, in this ledger's schema: a payment being recorded.
_WAITING = ("FROM pg_locks WHERE NOT granted AND relation IN "
            "('accounts'::regclass, 'x402_payments'::regclass)")


def recording_waits(engine: Engine) -> bool:
    """Whether a payment's record waits for the locked ledger (PostgreSQL)."""
    with engine.connect() as conn:
        return bool(conn.execute(text(f"SELECT count(*) {_WAITING}")).scalar_one())  # noqa: S608


def cut_recording(engine: Engine) -> None:
    """PostgreSQL terminates the connections of :func:`recording_waits`, as a database restart
    would: the record fails LEDGER_UNAVAILABLE after its payment settled."""
    with engine.connect() as conn:
        conn.execute(text(f"SELECT pg_terminate_backend(pid) {_WAITING}"))  # noqa: S608
