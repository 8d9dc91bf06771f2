"""The operator's own key, in an encrypted Ethereum keystore (``mcpbill wallet create``).

It pays downstream x402 challenges in a later release. The private key exists in memory only
while it is encrypted or used; it is never printed, logged or put in an error. The file is created
0600 by ``os.open`` (never made private afterwards, which would leave a window); the password comes
from ``MCPBILL_KEYSTORE_PASSWORD`` or a prompt, never from the command line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcpbill_cli.errors import AlreadyExists, InvalidInput, NotFound
from mcpbill_cli.fsutil import write_atomic, write_new_secret
from mcpbill_cli.wallet.errors import WrongPassword

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

ENV_KEYSTORE_PASSWORD = "MCPBILL_KEYSTORE_PASSWORD"  # noqa: S105 - a variable name, not a secret
KEYSTORE_FILE = "wallet.json"


def keystore_path(keys_dir: Path) -> Path:
    """Where ``wallet create`` writes the key: ``<home>/keys/wallet.json``."""
    return keys_dir / KEYSTORE_FILE


def create_keystore(path: Path, password: str, *, force: bool = False,
                    iterations: int | None = None) -> str:
    """Write a new key to ``path``, encrypted with ``password``; returns its checksum address.

    Refuses to replace an existing keystore unless ``force``. ``iterations`` is the scrypt cost
    (eth-account's strong default when ``None``; tests pass a small power of two).
    """
    from eth_account import Account

    if not password:
        raise InvalidInput("the keystore password must not be empty", field="password")
    if path.exists() and not force:
        raise AlreadyExists(
            f"{path} already holds a key: pass --force to replace it (the old key is lost "
            "unless you keep a copy)", path=str(path),
        )
    account = Account.create()
    document = Account.encrypt(account.key, password, iterations=iterations)
    _write_private(path, json.dumps(document).encode(), replace=force)
    return str(account.address)


def keystore_address(path: Path) -> str:
    """The address of a keystore, read from the file without decrypting it."""
    document = _read(path)
    return "0x" + str(document.get("address", "")).lower().removeprefix("0x")


def load_account(path: Path, password: str) -> LocalAccount:
    """Decrypt the keystore at ``path``; WRONG_PASSWORD if ``password`` does not open it."""
    from eth_account import Account
    from eth_keyfile.exceptions import EthKeyfileValueError

    document = _read(path)
    try:
        key = Account.decrypt(document, password)
    except EthKeyfileValueError:
        raise WrongPassword(f"the password does not open {path}", path=str(path)) from None
    account: LocalAccount = Account.from_key(key)
    return account


def _read(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"no keystore at {path}: run `mcpbill wallet create`",
                       path=str(path)) from None
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{path} is not a keystore: {exc}", path=str(path)) from None
    if not isinstance(document, dict) or "crypto" not in document:
        raise InvalidInput(f"{path} is not a keystore", path=str(path))
    return document


def _write_private(path: Path, content: bytes, *, replace: bool) -> None:
    """Mode 0600 from the first byte: a fresh file (O_EXCL), or an atomic replacement."""
    if replace:
        write_atomic(path, content, mode=0o600)
        return
    try:
        write_new_secret(path, content)
    except FileExistsError:
        raise AlreadyExists(f"{path} already holds a key: pass --force to replace it",
                            path=str(path)) from None
