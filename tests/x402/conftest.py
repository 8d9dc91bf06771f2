"""A real x402 peer for the resolver tests, and an agent with a budget on each ledger backend.

One anvil node per session, started with chain id 43113 so that the x402 v1 network name
``avalanche-fuji`` (all the official v1 facilitator knows are names) and the v2 CAIP-2 id
``eip155:43113`` name the same chain. On it: the test USDC compiled from
``tests/wallet/contracts/usdc.vy``, a facilitator account with gas, the operator's wallet with
100 USDC. The peer (official middleware and facilitator) is served by uvicorn on 127.0.0.1 in a
thread for the session and stopped in teardown.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import Engine
from web3 import Web3

from mcpbill_cli.keys import KeyRing, KeySource, init_keyring
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier
from mcpbill_cli.wallet.rpc import connect
from mcpbill_cli.x402 import AgentBudget, PaymentPolicy, X402Payer
from tests.verifier.billing_support import PRICING_DOC, USDC, fund, mint
from tests.wallet.conftest import token_build  # noqa: F401 - the session's compiled test USDC
from tests.wallet.devnet import Devnet, anvil_binary, deploy_devnet, free_port, stop, wait_for_rpc

from .peer import CHAIN_ID, PeerConfig, ServedApp, build_app, official_facilitator

PRICE = 10_000  # 0.01 USDC, what /v2/report and /v1/report cost
PRICEY = 2 * USDC  # /v2/pricey, over MAX_PER_CALL
MAX_PER_CALL = 50_000  # 0.05 USDC
OPERATOR_FUNDS = 100 * USDC


@dataclass
class Peer:
    """The paid API and the chain it settles on."""

    url: str
    devnet: Devnet
    operator: LocalAccount  # mcpbill's wallet: pays the challenges
    pay_to: str

    def balance(self, address: str) -> int:
        """Micro-USDC of the test token held by ``address``."""
        return int(self.devnet.usdc.functions.balanceOf(
            Web3.to_checksum_address(address)).call())

    def balances(self) -> tuple[int, int]:
        """(operator, payee) balances."""
        return self.balance(self.operator.address), self.balance(self.pay_to)


@pytest.fixture(scope="session")
def fuji_anvil() -> Iterator[str]:
    """An anvil node whose chain id is 43113 (the v1 name avalanche-fuji), stopped in teardown."""
    port = free_port()
    process = subprocess.Popen(
        [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(port), "--silent",
         "--chain-id", str(CHAIN_ID)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_rpc(url, process)
        yield url
    finally:
        stop(process)
        if process.stderr:
            process.stderr.close()


@pytest.fixture(scope="session")
def peer(fuji_anvil: str, token_build: dict[str, Any]) -> Iterator[Peer]:  # noqa: F811
    w3 = connect(fuji_anvil)
    devnet = deploy_devnet(w3, token_build, confirmations=1, name="fuji")
    facilitator_key, operator = Account.create(), Account.create()
    _wait(w3, w3.eth.send_transaction({"from": devnet.deployer, "to": facilitator_key.address,
                                        "value": 10**18}))
    _wait(w3, devnet.usdc.functions.mint(operator.address, OPERATOR_FUNDS).transact(
        {"from": devnet.deployer, "gas": 100_000}))
    config = PeerConfig(asset=devnet.usdc.address, pay_to=Web3.to_checksum_address(
        devnet.stranger), price=PRICE, pricey=PRICEY)
    facilitator = official_facilitator(facilitator_key.key.to_0x_hex(), fuji_anvil)
    served = ServedApp(build_app(config, facilitator))
    try:
        yield Peer(served.start(), devnet, operator, config.pay_to)
    finally:
        served.stop()


def _wait(w3: Web3, tx: Any) -> None:
    assert w3.eth.wait_for_transaction_receipt(tx)["status"] == 1


# --- the agent: a ledger, keys, a funded tenant and a credit token ------------------------------


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    from mcpbill_cli.clock import utcnow

    directory = tmp_path / "keys"
    init_keyring(directory, "EdDSA", now=utcnow(), force=False).save()
    return directory


@pytest.fixture
def verifier(engine: Engine, keys_dir: Path) -> Iterator[Verifier]:
    """A ledger-backed verifier; tenant acme is funded with 100 USDC."""
    from mcpbill_cli.clock import utcnow

    fund(engine, "acme", 100 * USDC, now=utcnow())
    verifier = Verifier(keys=KeySource(directory=keys_dir),
                        pricing=PricingTable.from_document(PRICING_DOC), engine=engine)
    yield verifier
    verifier.close()


@pytest.fixture
def new_token(verifier: Verifier, keys_dir: Path) -> Callable[..., IssuedToken]:
    """``new_token(limit=...)``: a credit token of tenant acme for every tool."""
    from mcpbill_cli.clock import utcnow

    def make(limit: int = USDC, scope: list[str] | None = None) -> IssuedToken:
        assert verifier.engine is not None
        return mint(verifier.engine, KeyRing.load(keys_dir), now=utcnow(), limit=limit,
                    scope=scope or ["*"])

    return make


@pytest.fixture
def policy(peer: Peer) -> PaymentPolicy:
    return PaymentPolicy.for_chains([peer.devnet.chain], max_amount=MAX_PER_CALL)


class SpySigner:
    """The operator's account, counting what it signs (the key stays inside the account)."""

    def __init__(self, account: LocalAccount) -> None:
        self.account = account
        self.signed: list[dict[str, Any]] = []

    @property
    def address(self) -> str:
        return str(self.account.address)

    def sign_typed_data(self, domain_data: dict[str, Any] | None = None,
                        message_types: dict[str, Any] | None = None,
                        message_data: dict[str, Any] | None = None,
                        full_message: dict[str, Any] | None = None) -> Any:
        self.signed.append({"domain": domain_data, "message": message_data})
        return self.account.sign_typed_data(domain_data=domain_data,
                                            message_types=message_types,
                                            message_data=message_data)


@pytest.fixture
def signer(peer: Peer) -> SpySigner:
    return SpySigner(peer.operator)


@dataclass
class Wire:
    """A transport that records every request it forwards (to see what was sent, and replay it)."""

    inner: httpx.BaseTransport = field(default_factory=httpx.HTTPTransport)
    sent: list[httpx.Request] = field(default_factory=list)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()

    def payments(self) -> list[str]:
        """Every payment header sent, v2 and v1."""
        return [value for request in self.sent for name, value in request.headers.items()
                if name.lower() in ("payment-signature", "x-payment")]


@pytest.fixture
def wire() -> Iterator[Wire]:
    recorder = Wire()
    yield recorder
    recorder.close()


@pytest.fixture
def payer_for(verifier: Verifier, signer: SpySigner,
              policy: PaymentPolicy) -> Callable[..., X402Payer]:
    """``payer_for(token, request_id=None, allow=None)``: the resolver for one agent call."""

    def make(token: str, *, request_id: str | None = None,
             allow: PaymentPolicy | None = None, tool: str = "search") -> X402Payer:
        budget = AgentBudget(verifier, token, tool=tool)
        return X402Payer(budget, signer, allow or policy, request_id=request_id)

    return make


# --- the accepting side (tests/x402/accepting.py) -------------------------------------------

from .accepting import facilitator_url, gas_account, shop  # noqa: E402, F401 - fixtures for test_accept*.py
