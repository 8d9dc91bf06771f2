"""Talking to a chain: a web3 connection, bounded retries with backoff, and the few reads we need.

Every read goes through :class:`Rpc`, which retries transient failures (connection errors,
timeouts, HTTP 429 and 5xx, JSON-RPC rate limits) with exponential backoff and then raises
``RPC_UNAVAILABLE`` naming the URL with any credentials or path key redacted. Before anything is
read for crediting, :meth:`Rpc.check_chain` makes sure the RPC serves the configured chain and
that the configured USDC contract has six decimals, so the on-chain integer is micro-USDC.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from mcpbill_cli.errors import ConfigInvalid
from mcpbill_cli.wallet.addresses import address_topic
from mcpbill_cli.wallet.chains import Chain
from mcpbill_cli.wallet.errors import RpcUnavailable, WrongChain

if TYPE_CHECKING:
    from web3 import Web3
    from web3.types import LogReceipt, TxReceipt

T = TypeVar("T")

TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
USDC_DECIMALS = 6
_DECIMALS_CALL = "0x313ce567"  # decimals()
_BALANCE_OF_CALL = "0x70a08231"  # balanceOf(address)
_RATE_LIMIT_CODES = {429, -32005}  # JSON-RPC errors that providers use for "slow down"
DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class RetryPolicy:
    """How often to retry a transient failure, waiting ``backoff * 2**n`` (capped) in between."""

    attempts: int = 5
    backoff: float = 0.25
    max_backoff: float = 4.0

    def delay(self, attempt: int) -> float:
        return float(min(self.backoff * 2**attempt, self.max_backoff))


class LogQueryRefused(Exception):
    """The node refused an ``eth_getLogs`` range (too many blocks or results): query less."""


def connect(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> Web3:
    """A web3 client for an HTTP(S) JSON-RPC endpoint. Retries are ours (:class:`Rpc`), not web3's,
    so that each call has one bounded, visible retry budget."""
    from web3 import HTTPProvider, Web3

    provider = HTTPProvider(url, request_kwargs={"timeout": timeout},
                            exception_retry_configuration=None)
    return Web3(provider)


def redact_rpc_url(url: str) -> str:
    """``scheme://host[:port]``, plus ``/***`` for any path or query: API keys live there."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return "<rpc url>"
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    creds = "***@" if parts.username or parts.password else ""
    hidden = "/***" if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{creds}{host}{hidden}"


class Rpc:
    """The chain reads mcpbill needs, each retried under one :class:`RetryPolicy`."""

    def __init__(self, w3: Web3, *, retry: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.w3 = w3
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._checked: set[str] = set()

    @property
    def url(self) -> str:
        """The endpoint, redacted; ``in-process`` for a provider without a URL (eth-tester)."""
        endpoint = getattr(self.w3.provider, "endpoint_uri", None)
        return redact_rpc_url(str(endpoint)) if endpoint else "in-process"

    def chain_id(self) -> int:
        return int(self._call("eth_chainId", lambda: self.w3.eth.chain_id))

    def block_number(self) -> int:
        return int(self._call("eth_blockNumber", lambda: self.w3.eth.block_number))

    def receipt(self, tx_hash: str) -> TxReceipt | None:
        """The receipt of a mined transaction; ``None`` if it is unknown or not mined yet."""
        from web3.exceptions import TransactionNotFound

        def read() -> TxReceipt | None:
            try:
                return self.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
            except TransactionNotFound:
                return None

        return self._call("eth_getTransactionReceipt", read)

    def block_hash(self, number: int) -> str | None:
        """The hash (lowercase 0x) of the node's block at height ``number``; ``None`` if it has
        none (past its head, or the block vanished)."""
        from web3.exceptions import BlockNotFound

        def read() -> str | None:
            try:
                block = self.w3.eth.get_block(number)
            except BlockNotFound:
                return None
            return "0x" + bytes(block["hash"]).hex()

        return self._call("eth_getBlockByNumber", read)

    def is_pending(self, tx_hash: str) -> bool:
        """True if the node knows the transaction but has not mined it (it is in the mempool)."""
        from web3.exceptions import TransactionNotFound

        def read() -> bool:
            try:
                tx = self.w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
            except TransactionNotFound:
                return False
            return tx.get("blockNumber") is None

        return self._call("eth_getTransactionByHash", read)

    def transfer_logs(self, token: str, recipient: str, first: int, last: int) -> list[LogReceipt]:
        """ERC-20 ``Transfer`` logs of ``token`` to ``recipient`` in blocks ``first..last``."""
        from web3 import Web3
        from web3.exceptions import Web3RPCError

        # Raw topics must be 0x-hex strings: HexBytes here silently matches nothing.
        params: Any = {"fromBlock": first, "toBlock": last,
                       "address": Web3.to_checksum_address(token),
                       "topics": [TRANSFER_TOPIC, None, address_topic(recipient)]}

        def read() -> list[LogReceipt]:
            try:
                return list(self.w3.eth.get_logs(params))
            except Web3RPCError as exc:
                if _is_rate_limit(exc):
                    raise
                raise LogQueryRefused(str(exc)) from None

        return self._call("eth_getLogs", read)

    def token_balance(self, token: str, owner: str) -> int:
        """``balanceOf(owner)`` of an ERC-20 ``token``, in the token's smallest unit."""
        data = _BALANCE_OF_CALL + address_topic(owner)[2:]
        return int.from_bytes(self._eth_call(token, data), "big")

    def eth_call(self, to: str, data: str) -> bytes:
        """The raw result of a read-only contract call (``data``: 0x hex calldata)."""
        return self._eth_call(to, data)

    def call_once(self, method: str, act: Callable[[], T]) -> T:
        """Run ``act`` once, never retried (sending a transaction): a failure is
        RPC_UNAVAILABLE naming the URL."""
        try:
            return act()
        except _rpc_errors() as exc:
            reason = _transient_reason(exc)
            if reason is None:
                raise self._permanent(method, exc) from None
            raise RpcUnavailable(f"{method} at {self.url} failed ({reason})", url=self.url,
                                 method=method, attempts=1, reason=reason) from None

    def check_chain(self, chain: Chain) -> None:
        """Refuse an RPC on another chain, or a USDC without six decimals (once per chain)."""
        if chain.caip2 in self._checked:
            return
        actual = self.chain_id()
        if actual != chain.chain_id:
            raise WrongChain(
                f"the RPC at {self.url} serves chain id {actual}, but {chain.name} is "
                f"{chain.caip2}: fix rpc_url under [chains.{chain.name}] or pass the right "
                "--chain", expected=chain.chain_id, actual=actual, url=self.url,
            )
        self._check_usdc_decimals(chain)
        self._checked.add(chain.caip2)

    def _check_usdc_decimals(self, chain: Chain) -> None:
        raw = self._eth_call(chain.usdc, _DECIMALS_CALL, refuse_as_config=True)
        decimals = int.from_bytes(raw, "big") if len(raw) == 32 else None
        if decimals != USDC_DECIMALS:
            raise ConfigInvalid(
                f"{chain.usdc} on {chain.name} is not a 6-decimal token (decimals: {decimals}); "
                f"check usdc under [chains.{chain.name}]", chain=chain.name,
            )

    def _eth_call(self, to: str, data: str, *, refuse_as_config: bool = False) -> bytes:
        from web3 import Web3

        def call() -> bytes:
            try:
                return bytes(self.w3.eth.call({"to": Web3.to_checksum_address(to),
                                               "data": data}))  # type: ignore[typeddict-item]
            except _revert_errors() as exc:
                if not refuse_as_config:
                    raise
                raise ConfigInvalid(f"{to} does not answer decimals(): not an ERC-20 token "
                                    f"({exc})") from None

        return self._call("eth_call", call)

    def _call(self, method: str, read: Callable[[], T]) -> T:
        """Run ``read``, retrying transient failures; then RPC_UNAVAILABLE with the URL."""
        attempt = 0
        while True:
            try:
                return read()
            except _rpc_errors() as exc:
                reason = _transient_reason(exc)
                if reason is None:
                    raise self._permanent(method, exc) from None
            attempt += 1
            if attempt >= self.retry.attempts:
                raise RpcUnavailable(
                    f"{method} at {self.url} failed {attempt} times ({reason}); check the RPC URL "
                    "and your provider's limits, then retry", url=self.url, method=method,
                    attempts=attempt, reason=reason,
                )
            self._sleep(self.retry.delay(attempt - 1))

    def _permanent(self, method: str, exc: Exception) -> RpcUnavailable:
        """A failure that retrying cannot fix (HTTP 401/403/404, a JSON-RPC error)."""
        import requests

        if isinstance(exc, requests.HTTPError):
            status = exc.response.status_code if exc.response is not None else 0
            return RpcUnavailable(
                f"the RPC at {self.url} answered HTTP {status} to {method}: check the URL and "
                "its API key", url=self.url, method=method, status=status,
            )
        return RpcUnavailable(f"the RPC at {self.url} refused {method}: {exc}", url=self.url,
                              method=method)


def _rpc_errors() -> tuple[type[Exception], ...]:
    """What a JSON-RPC read can fail with, transient or not (everything else is a bug)."""
    import requests
    from web3.exceptions import ProviderConnectionError, TimeExhausted, Web3RPCError

    return (requests.RequestException, ProviderConnectionError, TimeExhausted, Web3RPCError,
            ConnectionError)


def _revert_errors() -> tuple[type[Exception], ...]:
    """A reverted eth_call: web3's error over JSON-RPC, eth-tester's when in process."""
    import sys

    from web3.exceptions import ContractLogicError

    # eth-tester is a test-only dependency: if it is in use, it is already imported.
    tester = sys.modules.get("eth_tester.exceptions")
    failed = getattr(tester, "TransactionFailed", None)
    return (ContractLogicError, failed) if failed else (ContractLogicError,)


def _transient_reason(exc: Exception) -> str | None:
    """Why ``exc`` is worth retrying, or ``None`` if it is not transient."""
    import requests
    from web3.exceptions import (
        ProviderConnectionError,
        RequestTimedOut,
        TimeExhausted,
        TransactionIndexingInProgress,
    )

    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        return f"HTTP {status}" if status == 429 or status >= 500 else None
    if isinstance(exc, requests.Timeout | TimeExhausted | RequestTimedOut):
        return "timed out"
    if isinstance(exc, requests.ConnectionError | ConnectionError | ProviderConnectionError):
        return "connection failed"
    if isinstance(exc, TransactionIndexingInProgress):
        return "node still indexing"
    return "rate limited" if _is_rate_limit(exc) else None


def _is_rate_limit(exc: Exception) -> bool:
    response = getattr(exc, "rpc_response", None) or {}
    error = response.get("error") if isinstance(response, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code in _RATE_LIMIT_CODES or "rate limit" in str(exc).lower()
