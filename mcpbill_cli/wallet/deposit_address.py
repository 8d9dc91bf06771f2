"""The operator's deposit address (watch-only): ``[wallet] deposit_address`` in config.toml."""

from __future__ import annotations

import re
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
    """Write ``[wallet] deposit_address`` into config.toml, keeping every other key and, where
    the file's layout allows, every comment and line as it was; returns the address."""
    normalized = normalize_address(address)
    text = _read_text(config_path)
    data = _parse(config_path, text)
    wallet = data.setdefault("wallet", {})
    if not isinstance(wallet, dict):
        raise ConfigInvalid(f"{config_path}: [wallet] must be a table")
    wallet["deposit_address"] = normalized
    edited = _with_deposit_address(text, normalized)
    if _parses_to(edited, data):
        write_atomic(config_path, edited.encode(), mode=0o600)
    else:  # a layout the line edit does not handle (dotted keys, inline table): rewrite it all
        write_toml_atomic(config_path, data)
    return normalized


def write_toml_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``data`` as TOML in one rename (temp file, fsync, rename).

    Mode 0600: config.toml may hold RPC URLs with API keys in them.
    """
    import tomli_w

    write_atomic(path, tomli_w.dumps(data).encode(), mode=0o600)


_TABLE_HEADER = re.compile(r"^\s*\[")
_WALLET_HEADER = re.compile(r"^\s*\[\s*wallet\s*\]\s*(#.*)?$")
_DEPOSIT_KEY = re.compile(r"^\s*(deposit_address|\"deposit_address\"|'deposit_address')\s*=")


def _with_deposit_address(text: str, address: str) -> str:
    """``text`` with the deposit address set by editing one line or adding one (the caller
    checks that the result parses to what it should)."""
    line = f'deposit_address = "{address}"\n'
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    header = next((n for n, current in enumerate(lines) if _WALLET_HEADER.match(current)), None)
    if header is None:  # a dotted key or inline table elsewhere makes this fail to parse
        return "".join(lines) + ("\n" if lines else "") + "[wallet]\n" + line
    start = header + 1
    end = next((n for n in range(start, len(lines)) if _TABLE_HEADER.match(lines[n])),
               len(lines))
    for n in range(start, end):
        if _DEPOSIT_KEY.match(lines[n]):
            lines[n] = line
            return "".join(lines)
    lines.insert(start, line)
    return "".join(lines)


def _parses_to(text: str, expected: Mapping[str, Any]) -> bool:
    try:
        return tomllib.loads(text) == expected
    except tomllib.TOMLDecodeError:
        return False


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigInvalid(f"cannot read {path}: {exc}", path=str(path)) from None


def _parse(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigInvalid(f"cannot read {path}: {exc}", path=str(path)) from None
