"""The operator's deposit address (watch-only): ``[wallet] deposit_address`` in config.toml."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mcpbill_cli.errors import ConfigInvalid
from mcpbill_cli.fsutil import write_atomic
from mcpbill_cli.wallet.addresses import normalize_address
from mcpbill_cli.wallet.chains import wallet_section
from mcpbill_cli.wallet.errors import NoDepositAddress


def get_deposit_address(file: Mapping[str, Any]) -> str:
    """The deposit address from a parsed config.toml, lowercase; refuses when none is set."""
    value = wallet_section(file).get("deposit_address")
    if not value:
        raise NoDepositAddress(
            "no deposit address yet: run `mcpbill wallet address --set 0x...` (or `mcpbill "
            "wallet create` and set the address it prints)"
        )
    return normalize_address(str(value), field="[wallet] deposit_address")


def set_deposit_address(config_path: Path, address: str) -> str:
    """Write ``[wallet] deposit_address`` into config.toml, keeping every other key; returns it."""
    normalized = normalize_address(address)
    data = _read_toml(config_path)
    wallet = data.setdefault("wallet", {})
    if not isinstance(wallet, dict):
        raise ConfigInvalid(f"{config_path}: [wallet] must be a table")
    wallet["deposit_address"] = normalized
    write_toml_atomic(config_path, data)
    return normalized


def write_toml_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``data`` as TOML in one rename (temp file, fsync, rename).

    Mode 0600: config.toml may hold RPC URLs with API keys in them.
    """
    import tomli_w

    write_atomic(path, tomli_w.dumps(data).encode(), mode=0o600)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigInvalid(f"cannot read {path}: {exc}", path=str(path)) from None
