"""Whether this home can accept x402 payments, and every reason it cannot.

A pricing file can turn x402 on (``[x402]``) in a home that cannot honour it: demo mode, no
chain or RPC URL, no deposit address, or nothing to settle with (no ``[x402] facilitator_url``
and no keystore, or no password for it). A server then offers no x402 and says so once in its
log; ``mcpbill status`` and ``mcpbill pricing validate`` say it up front, all reasons at once,
and :meth:`~mcpbill_cli.x402.accept.Acceptor.from_settings` asks the same questions here, so the
three never disagree.

Nothing here contacts a chain or decrypts a keystore: it reads config.toml, the pricing table,
the keys directory and the environment. It imports neither web3 nor the MCP SDK.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from mcpbill_cli.config import Settings
from mcpbill_cli.errors import BillingError, ConfigInvalid
from mcpbill_cli.pricing import PricingTable, x402_offered

__all__ = ["X402Readiness", "facilitator_url", "readiness"]

T = TypeVar("T")


@dataclass(frozen=True)
class X402Readiness:
    """``requested``: the pricing table has ``[x402]``; ``accepting``: and nothing it needs is
    missing. ``reasons`` say what is missing, each with what to do about it."""

    requested: bool
    accepting: bool
    chain: str | None = None
    network: str | None = None
    pay_to: str | None = None
    settlement: str | None = None  # "facilitator" or "self"
    facilitator_url: str | None = None
    tools: tuple[str, ...] = ()  # the tools offered for x402
    reasons: tuple[str, ...] = ()


def readiness(settings: Settings, table: PricingTable) -> X402Readiness:
    """What ``settings`` and ``table`` allow (see the module docstring)."""
    if table.x402 is None:
        return X402Readiness(requested=False, accepting=False)
    reasons: list[str] = []
    if settings.demo:
        reasons.append("demo mode: there is no chain to be paid on; set mode = \"live\" in "
                       "config.toml")
    chain = _checked(reasons, lambda: _chain(table.x402.chain if table.x402 else None,
                                             settings.file))
    if chain is not None:
        _checked(reasons, lambda: _rpc_url(chain))  # x402 reads the chain to verify, settle
    pay_to = _checked(reasons, lambda: _deposit_address(settings.file))
    url = _checked(reasons, lambda: facilitator_url(settings.file))
    _checked(reasons, lambda: _recovery_times(settings.file))
    settlement = "facilitator" if url is not None else "self"
    if url is None:
        reasons.extend(_self_settlement_problems(settings))
    tools = tuple(sorted(name for name in table.tools if _offered(table, name)))
    if not tools and not _default_offered(table):
        reasons.append("no paid, fixed-price tool offers x402: set [x402] enabled = true, or "
                       "x402 = true on a tool")
    return X402Readiness(
        requested=True, accepting=not reasons, chain=chain.name if chain else None,
        network=chain.caip2 if chain else None, pay_to=pay_to, settlement=settlement,
        facilitator_url=url, tools=tools, reasons=tuple(reasons))


def facilitator_url(file: Mapping[str, Any]) -> str | None:
    """``[x402] facilitator_url`` of config.toml, ``None`` when unset (self-settlement)."""
    section = file.get("x402", {})
    if not isinstance(section, Mapping):
        raise ConfigInvalid("config [x402] must be a table")
    url = section.get("facilitator_url")
    if url is None:
        return None
    if not isinstance(url, str) or "://" not in url:
        raise ConfigInvalid("config [x402] facilitator_url must be a URL like https://...")
    return url


def _checked(reasons: list[str], check: Callable[[], T]) -> T | None:
    """What ``check`` returns, or ``None`` with its refusal's message kept as a reason."""
    try:
        return check()
    except BillingError as error:
        reasons.append(error.message)
        return None


def _chain(selector: str | None, file: Mapping[str, Any]) -> Any:
    from mcpbill_cli.wallet.chains import resolve_chain

    return resolve_chain(selector, file)


def _rpc_url(chain: Any) -> str:
    from mcpbill_cli.wallet.chains import rpc_url

    return rpc_url(chain)


def _recovery_times(file: Mapping[str, Any]) -> tuple[int, float]:
    from mcpbill_cli.x402.recovery import recovery_times

    return recovery_times(file)


def _deposit_address(file: Mapping[str, Any]) -> str:
    from mcpbill_cli.wallet.deposit_address import get_deposit_address

    return get_deposit_address(file)


def _self_settlement_problems(settings: Settings) -> list[str]:
    """Why the operator's keystore cannot pay the gas of self-settlement (none: it can)."""
    from mcpbill_cli.wallet.keystore import ENV_KEYSTORE_PASSWORD, keystore_path

    path = keystore_path(settings.keys_dir)
    if not path.is_file():
        return [f"no [x402] facilitator_url in config.toml and no keystore at {path} to settle "
                "payments with: set a facilitator_url, or run `mcpbill wallet create` and fund "
                "its address with gas"]
    if not os.environ.get(ENV_KEYSTORE_PASSWORD):
        return [f"{ENV_KEYSTORE_PASSWORD} is not set: the keystore at {path} cannot be opened "
                "to settle payments"]
    return []


def _offered(table: PricingTable, tool: str) -> bool:
    entry = table.tools[tool]
    return x402_offered(table, tool) and entry.price is not None and entry.price > 0


def _default_offered(table: PricingTable) -> bool:
    """Whether tools the table does not list are offered x402 at a paid ``default_price``."""
    enabled = table.x402 is not None and table.x402.enabled
    return enabled and table.default_price is not None and table.default_price > 0
