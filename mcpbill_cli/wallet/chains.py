"""The chains mcpbill accepts USDC on: four built in, more (and RPC URLs) from ``config.toml``.

```toml
[wallet]
chain = "base"                  # the default for --chain
deposit_address = "0x..."

[chains.base]
rpc_url = "https://..."         # built-in chains take only rpc_url and confirmations

[chains.local]                  # any other chain needs its CAIP-2 id and its USDC contract
caip2 = "eip155:31337"
usdc = "0x..."
rpc_url = "http://127.0.0.1:8545"
confirmations = 2
```
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from mcpbill_cli.errors import ConfigInvalid, InvalidInput
from mcpbill_cli.wallet.addresses import normalize_address
from mcpbill_cli.wallet.errors import NoRpcUrl, UnknownChain

# Flag > environment > config file: the CLI's --rpc-url reads this variable (Typer envvar=).
ENV_RPC_URL = "MCPBILL_RPC_URL"
DEFAULT_CHAIN = "base"
DEFAULT_CONFIRMATIONS = 12

_CAIP2 = re.compile(r"eip155:[1-9][0-9]{0,18}")
_BUILTIN_KEYS = {"rpc_url", "confirmations"}
_CUSTOM_KEYS = _BUILTIN_KEYS | {"caip2", "usdc", "eip712_name", "eip712_version"}


@dataclass(frozen=True)
class Chain:
    """One EVM chain: where its USDC lives and how many confirmations make a block final."""

    name: str
    caip2: str
    usdc: str  # lowercase 0x address
    eip712_name: str  # USDC's EIP-712 domain name: "USD Coin" on mainnets, "USDC" on testnets
    eip712_version: str = "2"
    confirmations: int = DEFAULT_CONFIRMATIONS
    rpc_url: str | None = None

    @property
    def chain_id(self) -> int:
        return int(self.caip2.split(":", 1)[1])


BUILTIN_CHAINS: dict[str, Chain] = {
    chain.name: chain
    for chain in (
        Chain("base", "eip155:8453", "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913", "USD Coin"),
        Chain("base-sepolia", "eip155:84532", "0x036cbd53842c5426634e7929541ec2318f3dcf7e",
              "USDC"),
        Chain("ethereum", "eip155:1", "0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48", "USD Coin"),
        Chain("sepolia", "eip155:11155111", "0x1c7d4b196cb0c7b01d743fbc6116a902379c7238",
              "USDC"),
    )
}


def configured_chains(file: Mapping[str, Any]) -> dict[str, Chain]:
    """The built-in chains with ``[chains.*]`` from a parsed config.toml applied, by short name."""
    section = file.get("chains", {})
    if not isinstance(section, Mapping):
        raise ConfigInvalid("config [chains] must be a table of chains")
    chains = dict(BUILTIN_CHAINS)
    for name, entry in section.items():
        if not isinstance(entry, Mapping):
            raise ConfigInvalid(f"config [chains.{name}] must be a table")
        chains[name] = _chain_from_config(name, entry)
    _refuse_duplicate_ids(chains)
    return chains


def resolve_chain(selector: str | None, file: Mapping[str, Any]) -> Chain:
    """The chain named ``selector`` (short name or CAIP-2 id); ``None`` means [wallet] chain."""
    chains = configured_chains(file)
    wanted = selector or str(wallet_section(file).get("chain", DEFAULT_CHAIN))
    for chain in chains.values():
        if wanted in (chain.name, chain.caip2):
            return chain
    raise UnknownChain(
        f"unknown chain {wanted!r}: use one of {', '.join(sorted(chains))}, or add "
        f"[chains.{wanted}] with caip2 and usdc to config.toml", chain=wanted,
    )


def rpc_url(chain: Chain, override: str | None = None) -> str:
    """The RPC URL to use: the --rpc-url flag or MCPBILL_RPC_URL, else the chain's config."""
    url = override or chain.rpc_url
    if not url:
        raise NoRpcUrl(
            f"no RPC URL for {chain.name}: set rpc_url under [chains.{chain.name}] in "
            f"config.toml, or pass --rpc-url (or {ENV_RPC_URL})", chain=chain.name,
        )
    return url


def wallet_section(file: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``[wallet]`` table of a parsed config.toml (empty when absent)."""
    section = file.get("wallet", {})
    if not isinstance(section, Mapping):
        raise ConfigInvalid("config [wallet] must be a table")
    return section


def _chain_from_config(name: str, entry: Mapping[str, Any]) -> Chain:
    builtin = BUILTIN_CHAINS.get(name)
    allowed = _BUILTIN_KEYS if builtin else _CUSTOM_KEYS
    unknown = sorted(set(entry) - allowed)
    if unknown:
        # Redefining a built-in chain's USDC would let a lookalike token be credited.
        raise ConfigInvalid(f"config [chains.{name}]: unknown or fixed key(s) "
                            f"{', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    url = _rpc_url(name, entry)
    confirmations = _confirmations(name, entry)
    base = builtin or Chain(name=name, caip2=_caip2(name, entry), usdc=_usdc(name, entry),
                            eip712_name=str(entry.get("eip712_name", "USD Coin")),
                            eip712_version=str(entry.get("eip712_version", "2")))
    return replace(base, rpc_url=url or base.rpc_url,
                   confirmations=confirmations or base.confirmations)


def _caip2(name: str, entry: Mapping[str, Any]) -> str:
    value = entry.get("caip2")
    if not isinstance(value, str) or not _CAIP2.fullmatch(value):
        raise ConfigInvalid(f'config [chains.{name}] needs caip2 = "eip155:<chain id>"')
    return value


def _usdc(name: str, entry: Mapping[str, Any]) -> str:
    value = entry.get("usdc")
    if not isinstance(value, str):
        raise ConfigInvalid(f'config [chains.{name}] needs usdc = "0x<USDC contract>"')
    try:
        return normalize_address(value, field=f"[chains.{name}] usdc")
    except InvalidInput as exc:
        raise ConfigInvalid(f"config {exc}") from None


def _rpc_url(name: str, entry: Mapping[str, Any]) -> str | None:
    value = entry.get("rpc_url")
    if value is not None and (not isinstance(value, str) or "://" not in value):
        raise ConfigInvalid(f"config [chains.{name}] rpc_url must be a URL like https://...")
    return value


def _confirmations(name: str, entry: Mapping[str, Any]) -> int | None:
    value = entry.get("confirmations")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise ConfigInvalid(f"config [chains.{name}] confirmations must be an integer >= 1")
    return value


def _refuse_duplicate_ids(chains: Mapping[str, Chain]) -> None:
    seen: dict[str, str] = {}
    for chain in chains.values():
        if chain.caip2 in seen:
            raise ConfigInvalid(f"config: chains {seen[chain.caip2]} and {chain.name} are both "
                                f"{chain.caip2}; keep one")
        seen[chain.caip2] = chain.name
