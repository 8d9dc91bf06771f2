"""The operator's keystore: private from the first byte, the password never shown or stored."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from mcpbill_cli.errors import AlreadyExists, InvalidInput, NotFound
from mcpbill_cli.wallet.errors import WrongPassword
from mcpbill_cli.wallet.keystore import (
    create_keystore,
    keystore_address,
    keystore_path,
    load_account,
)

CHEAP = 2**10  # scrypt cost for tests; the default (2**18) takes a second per call


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_keystore_is_0600_encrypted_and_opens_with_its_password(tmp_path: Path) -> None:
    path = keystore_path(tmp_path / "keys")
    address = create_keystore(path, "correct horse", iterations=CHEAP)

    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    account = load_account(path, "correct horse")
    assert account.address == address
    assert keystore_address(path) == address.lower()
    text = path.read_text()
    assert "correct horse" not in text
    assert account.key.hex() not in text and account.key.to_0x_hex() not in text
    assert json.loads(text)["crypto"]["kdf"] == "scrypt"


def test_a_wrong_password_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wallet.json"
    create_keystore(path, "right-pass", iterations=CHEAP)
    with pytest.raises(WrongPassword) as refused:
        load_account(path, "guessed-pass")
    assert "guessed-pass" not in str(refused.value.to_dict())


def test_an_existing_keystore_is_not_replaced_without_force(tmp_path: Path) -> None:
    path = tmp_path / "wallet.json"
    first = create_keystore(path, "pw", iterations=CHEAP)
    with pytest.raises(AlreadyExists, match="--force"):
        create_keystore(path, "pw", iterations=CHEAP)
    assert load_account(path, "pw").address == first

    second = create_keystore(path, "pw2", force=True, iterations=CHEAP)
    assert second != first and mode(path) == 0o600
    assert load_account(path, "pw2").address == second
    assert sorted(os.listdir(tmp_path)) == ["wallet.json"]


def test_an_empty_password_and_a_missing_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="empty"):
        create_keystore(tmp_path / "wallet.json", "", iterations=CHEAP)
    with pytest.raises(NotFound, match="wallet create"):
        load_account(tmp_path / "wallet.json", "pw")


@pytest.mark.slow
def test_the_default_key_derivation_is_strong(tmp_path: Path) -> None:
    path = tmp_path / "wallet.json"
    address = create_keystore(path, "pw")
    assert json.loads(path.read_text())["crypto"]["kdfparams"]["n"] >= 2**18
    assert load_account(path, "pw").address == address
