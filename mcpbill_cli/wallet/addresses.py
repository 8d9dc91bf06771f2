"""EVM addresses and transaction hashes: validated on the way in, stored lowercase.

A mixed-case address must carry a valid EIP-55 checksum, so a typo in one character is caught
before money is attributed to it. Only ``eth_hash`` is needed (about 0.1 s), not web3.
"""

from __future__ import annotations

import re

from mcpbill_cli.errors import InvalidInput

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_TX_HASH = re.compile(r"0x[0-9a-fA-F]{64}")


def normalize_address(text: str, *, field: str = "address") -> str:
    """``0x`` + 40 hex digits, lowercase; a mixed-case input must have a valid EIP-55 checksum."""
    raw = text.strip()
    if not _ADDRESS.fullmatch(raw):
        raise InvalidInput(f"{field} {text!r} is not an address: expected 0x and 40 hex digits",
                           field=field)
    digits = raw[2:]
    mixed = digits != digits.lower() and digits != digits.upper()
    if mixed and checksum_address(raw) != raw:
        raise InvalidInput(
            f"{field} {text!r} fails its EIP-55 checksum: check for a typo, or paste it in "
            "lowercase if you are sure", field=field,
        )
    return "0x" + digits.lower()


def checksum_address(address: str) -> str:
    """The EIP-55 mixed-case form of ``address``, for display."""
    from eth_hash.auto import keccak

    digits = address[2:].lower()
    hashed = keccak(digits.encode("ascii")).hex()
    pairs = zip(digits, hashed[:40], strict=True)
    return "0x" + "".join(char.upper() if int(nibble, 16) >= 8 else char for char, nibble in pairs)


def normalize_tx_hash(text: str) -> str:
    """``0x`` + 64 hex digits, lowercase."""
    raw = text.strip()
    if not _TX_HASH.fullmatch(raw):
        raise InvalidInput(f"{text!r} is not a transaction hash: expected 0x and 64 hex digits",
                           field="tx")
    return raw.lower()


def address_topic(address: str) -> str:
    """An address as a 32-byte log topic, ``0x``-hex (raw ``eth_getLogs`` wants strings)."""
    return "0x" + "0" * 24 + normalize_address(address)[2:]
