"""Helpers for the wallet tests: a devnet with a test USDC, anvil process control, ledger reads."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from web3 import Web3

from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.ledger.models import accounts, deposits, transfers
from mcpbill_cli.wallet.chains import Chain

CONTRACTS = Path(__file__).parent / "contracts"
REPO = Path(__file__).resolve().parents[2]
ANVIL = REPO / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
USDC = 10**6  # micro-USDC per USDC


@dataclass
class Devnet:
    """A chain with a USDC, a lookalike, funded senders and a deposit address."""

    w3: Web3
    usdc: Any
    lookalike: Any
    chain: Chain
    deployer: str
    deposit_address: str
    alice: str  # senders holding 1,000 USDC and 1,000 lookalike tokens each
    bob: str
    stranger: str  # holds nothing; receives transfers that are not deposits

    def pay(self, sender: str, amount: int, *, to: str | None = None,
            token: Any = None) -> str:
        """Send ``amount`` micro-units of ``token`` (USDC by default); the tx hash, 0x hex."""
        token = token or self.usdc
        receiver = Web3.to_checksum_address(to or self.deposit_address)
        tx = token.functions.transfer(receiver, amount).transact({"from": sender, "gas": 100_000})
        self.w3.eth.wait_for_transaction_receipt(tx)
        return str(tx.to_0x_hex())

    def mine(self, blocks: int) -> None:
        if self.anvil:
            self.w3.provider.make_request("anvil_mine", [hex(blocks)])  # type: ignore[arg-type]
        else:
            self.w3.testing.mine(blocks)

    def rpc(self, method: str, *params: Any) -> Any:
        response = self.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]
        assert "error" not in response, response
        return response["result"]

    @property
    def anvil(self) -> bool:
        return bool(getattr(self.w3.provider, "endpoint_uri", None))


def deploy_devnet(w3: Web3, build: dict[str, Any], *, confirmations: int = 3,
                  name: str = "devnet") -> Devnet:
    deployer, deposit, alice, bob, stranger = w3.eth.accounts[:5]
    factory = w3.eth.contract(abi=build["abi"], bytecode=build["bytecode"])

    def deploy() -> Any:
        tx = factory.constructor("USD Coin", "USDC", "2").transact({"from": deployer,
                                                                   "gas": 3_000_000})
        address = w3.eth.wait_for_transaction_receipt(tx)["contractAddress"]
        return w3.eth.contract(address=address, abi=build["abi"])

    usdc, lookalike = deploy(), deploy()
    for token in (usdc, lookalike):
        for holder in (alice, bob):
            tx = token.functions.mint(holder, 1_000 * USDC).transact({"from": deployer,
                                                                      "gas": 100_000})
            w3.eth.wait_for_transaction_receipt(tx)
    chain = Chain(name=name, caip2=f"eip155:{w3.eth.chain_id}", usdc=usdc.address.lower(),
                  eip712_name="USD Coin", confirmations=confirmations)
    return Devnet(w3=w3, usdc=usdc, lookalike=lookalike, chain=chain, deployer=deployer,
                  deposit_address=deposit.lower(), alice=alice, bob=bob, stranger=stranger)


# --- anvil ------------------------------------------------------------------------------------


def anvil_binary() -> Path:
    found = ANVIL if ANVIL.exists() else shutil.which("anvil")
    if found:
        return Path(found)
    message = (f"anvil not found at {ANVIL}: run `npm ci` (or `npm install --prefix {REPO} "
               "@foundry-rs/anvil-linux-amd64`)")
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_rpc(url: str, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 1}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"anvil exited with {process.returncode}")
        try:
            w3.eth.chain_id  # noqa: B018 - the call is the readiness probe
            return
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.05)
    raise RuntimeError(f"anvil did not answer at {url} within {timeout} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate, wait, and kill on timeout: nothing is left running."""
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


# --- ledger assertions ------------------------------------------------------------------------


def posted(engine: Engine, account: str) -> int:
    """An account's posted balance (credits - debits); 0 for an account that does not exist."""
    a = accounts.c
    with reading(engine) as conn:
        row = conn.execute(select(a.credits_posted - a.debits_posted)
                           .where(a.id == account)).scalar_one_or_none()
    return int(row or 0)


def ledger_rows(engine: Engine) -> dict[str, int]:
    """How many deposits and transfers the ledger holds, and the sum of all balances (0)."""
    a = accounts.c
    with reading(engine) as conn:
        return {
            "deposits": conn.execute(select(func.count()).select_from(deposits)).scalar_one(),
            "transfers": conn.execute(select(func.count()).select_from(transfers)).scalar_one(),
            "sum": int(conn.execute(select(func.coalesce(
                func.sum(a.credits_posted - a.debits_posted), 0))).scalar_one()),
        }


def deposit_rows(engine: Engine) -> list[dict[str, Any]]:
    d = deposits.c
    with reading(engine) as conn:
        query = select(d.id, d.status, d.tenant, d.amount, d.sender, d.transfer_id)
        return [dict(row._mapping) for row in conn.execute(query.order_by(d.block_number,
                                                                          d.log_index))]
