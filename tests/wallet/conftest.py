"""A real EVM for the wallet tests: eth-tester in process, or anvil over JSON-RPC.

Both get the same test USDC (compiled from ``contracts/usdc.vy`` at test time, once per session)
and a lookalike: the same contract with the same name at another address.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from web3 import Web3

from .devnet import CONTRACTS, Devnet, anvil_binary, deploy_devnet, free_port, stop, wait_for_rpc


@pytest.fixture(scope="session")
def token_build() -> dict[str, Any]:
    """The test USDC's ABI and bytecode, compiled by vyper once per session."""
    import vyper

    source = (CONTRACTS / "usdc.vy").read_text()
    return dict(vyper.compile_code(source, output_formats=["abi", "bytecode"]))


@pytest.fixture(scope="session")
def tester_devnet(token_build: dict[str, Any]) -> Devnet:
    """One in-process chain (eth-tester + py-evm) per session; three confirmations are final."""
    from web3 import EthereumTesterProvider

    return deploy_devnet(Web3(EthereumTesterProvider()), token_build)


@pytest.fixture
def devnet(tester_devnet: Devnet) -> Iterator[Devnet]:
    """The in-process chain, reverted after each test to its state after deployment."""
    tester = tester_devnet.w3.provider.ethereum_tester  # type: ignore[attr-defined]
    snapshot = tester.take_snapshot()
    yield tester_devnet
    tester.revert_to_snapshot(snapshot)


@pytest.fixture
def anvil_url() -> Iterator[str]:
    """A fresh anvil node on 127.0.0.1 (chain id 31337), stopped in teardown."""
    binary = anvil_binary()
    port = free_port()
    process = subprocess.Popen(
        [str(binary), "--host", "127.0.0.1", "--port", str(port), "--silent"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_rpc(url, process)
        yield url
    finally:
        stop(process)
        if process.stderr:
            process.stderr.close()


@pytest.fixture
def anvil_devnet(anvil_url: str, token_build: dict[str, Any]) -> Devnet:
    """The test USDC on anvil, over HTTP JSON-RPC; two confirmations make a block final."""
    from mcpbill_cli.wallet.rpc import connect

    return deploy_devnet(connect(anvil_url), token_build, confirmations=2, name="local")
