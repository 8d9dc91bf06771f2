"""Signing keys: Ed25519 (default), ES256 or HS256, kept in ``<home>/keys/``, private files 0600.

``keyring.json`` lists every key with its status: ``active`` signs new tokens and receipts;
``verifying`` keys (rotated out) still verify until their last token expires; ``retired`` keys
verify nothing. Private key material is never printed and never leaves this module.

``keyring.json.lock`` beside it keeps processes apart: whatever rewrites the ring holds it
exclusively (:func:`editing`, ``init``), whatever signs tokens shares it (:func:`active_signer`).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mcpbill_cli.errors import (
    AlreadyExists,
    InvalidInput,
    KeyringCorrupt,
    NotFound,
    NotInitialized,
)
from mcpbill_cli.fsutil import file_lock, write_atomic, write_new_secret

ALGORITHMS = ("EdDSA", "ES256", "HS256")
DEFAULT_ALGORITHM = "EdDSA"
INDEX = "keyring.json"
LOCK = INDEX + ".lock"
MIN_HMAC_BYTES = 32
STATUSES = ("active", "verifying", "retired")
_KID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class KeyInfo:
    kid: str
    alg: str
    created_at: str
    status: str  # active | verifying | retired
    verify_until: str | None = None

    def verifies_at(self, now: datetime) -> bool:
        if self.status == "active":
            return True
        if self.status == "verifying" and self.verify_until is not None:
            return datetime.fromisoformat(self.verify_until) > now
        return False


@dataclass(frozen=True)
class VerificationKey:
    """A key the verifier may check a signature with, and the one algorithm it is pinned to."""

    kid: str
    alg: str
    key: Any


class KeyRing:
    """The keys in one directory. Reading is cheap; private keys load only when signing."""

    def __init__(self, directory: Path, keys: dict[str, KeyInfo]) -> None:
        self.directory = directory
        self.keys = keys

    @classmethod
    def load(cls, directory: Path) -> KeyRing:
        path = directory / INDEX
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise _no_keys(directory) from None
        except (OSError, ValueError, RecursionError) as exc:
            raise _corrupt(path, str(exc) or type(exc).__name__) from None
        infos = [_key_info(entry, path) for entry in _entries(raw, path)]
        return cls(directory, {info.kid: info for info in infos})

    @classmethod
    def exists(cls, directory: Path) -> bool:
        return (directory / INDEX).exists()

    def active(self) -> KeyInfo:
        for info in self.keys.values():
            if info.status == "active":
                return info
        raise NotInitialized("no active signing key: run `mcpbill keys rotate`")

    def get(self, kid: str) -> KeyInfo:
        try:
            return self.keys[kid]
        except KeyError:
            raise NotFound(f"no key {kid!r}; `mcpbill keys list` shows the keys") from None

    def signing_key(self) -> tuple[KeyInfo, Any]:
        """The active key's metadata and private key object (or HMAC secret bytes)."""
        info = self.active()
        return info, _load_private(self.directory, info)

    def verification_keys(self, now: datetime | None = None) -> dict[str, VerificationKey]:
        """Every key that may verify now, by kid, each pinned to its own algorithm."""
        moment = now or datetime.now(UTC)
        return {
            info.kid: VerificationKey(info.kid, info.alg, _public(self.directory, info))
            for info in self.keys.values()
            if info.verifies_at(moment)
        }

    def jwks(self, now: datetime | None = None, *, every: bool = False) -> dict[str, Any]:
        """The JWKS document of public keys that verify tokens now; with ``every``, of every
        key the ring ever held, retired ones too, to check old receipts and seals (never hand
        that one to a verifier of tokens). HS256 secrets are never exported."""
        keys = (self.signature_keys() if every else self.verification_keys(now)).values()
        return {"keys": [_to_jwk(vk) for vk in keys if vk.alg != "HS256"]}

    def signature_keys(self) -> dict[str, VerificationKey]:
        """Every key the ring ever signed with, whatever its status: receipts and seals stay
        verifiable after their key is rotated out or retired."""
        return {info.kid: VerificationKey(info.kid, info.alg, _public(self.directory, info))
                for info in self.keys.values()}

    def save(self) -> None:
        doc = {"keys": [asdict(k) for k in self.keys.values()]}
        write_atomic(self.directory / INDEX, (json.dumps(doc, indent=2) + "\n").encode(),
                     mode=0o600)


def ring_lock(directory: Path, *, shared: bool = False) -> AbstractContextManager[None]:
    """The lock of the key ring in ``directory`` (made there if missing): exclusive to rewrite
    the ring, ``shared`` to sign tokens with its active key."""
    return file_lock(directory / LOCK, shared=shared, mode=0o600)


@contextmanager
def editing(directory: Path, *, dry_run: bool = False) -> Iterator[KeyRing]:
    """The key ring, to change in the block; saved when the block ends without an error.

    Read and saved under the ring's exclusive lock, so a concurrent rotate, retire or init
    waits for this one and reads what it saved. Unlocked, it would save the ring as it read it
    before: the key made here lost, and tokens it signed out there unverifiable. A dry run
    reads without the lock and saves nothing.
    """
    if dry_run:
        yield KeyRing.load(directory)
        return
    _require_keys(directory)
    with ring_lock(directory):
        ring = KeyRing.load(directory)
        yield ring
        ring.save()


@contextmanager
def active_signer(directory: Path) -> Iterator[tuple[KeyInfo, Any]]:
    """The active key and its private key, to sign tokens with in the block; end the block
    once they are recorded in the ledger.

    The ring's shared lock is held meanwhile: ``keys rotate`` waits until those tokens are
    recorded before it reads when the last token of the key it rotates out expires (the
    key's ``verify_until``), and a token signed after the rotation is signed by the new key.
    """
    _require_keys(directory)
    with ring_lock(directory, shared=True):
        yield KeyRing.load(directory).signing_key()


def _require_keys(directory: Path) -> None:
    """NOT_INITIALIZED without a key ring, before a lock file would be made for none."""
    if not KeyRing.exists(directory):
        raise _no_keys(directory)


def _no_keys(directory: Path) -> NotInitialized:
    return NotInitialized(f"no signing keys in {directory}: run `mcpbill init`")


def create_key(ring: KeyRing, alg: str, *, now: datetime, write: bool = True) -> KeyInfo:
    """Write a new private key file (0600) and make it the active key of ``ring``; without
    ``write`` (a dry run) only ``ring`` in memory changes."""
    if alg not in ALGORITHMS:
        raise InvalidInput(f"algorithm {alg!r} is not one of {', '.join(ALGORITHMS)}")
    kid = f"{now:%Y%m%d}-{secrets.token_hex(4)}"
    if write:
        write_new_secret(_key_path(ring.directory, kid, alg), _generate(alg))
    info = KeyInfo(kid=kid, alg=alg, created_at=now.isoformat(), status="active")
    ring.keys[kid] = info
    return info


def rotate(ring: KeyRing, alg: str | None, *, now: datetime, last_expiry: datetime | None,
           write: bool = True) -> KeyInfo:
    """A new active key, of the active key's algorithm unless ``alg`` names another; the old
    one verifies until ``last_expiry`` (its last token's ``exp``). Without ``write`` (a dry
    run) no key file is made."""
    old = ring.active()
    until = max(last_expiry or now, now)
    ring.keys[old.kid] = replace(old, status="verifying", verify_until=until.isoformat())
    return create_key(ring, alg or old.alg, now=now, write=write)


def retire(ring: KeyRing, kid: str) -> KeyInfo:
    """Stop verifying with ``kid`` at once. The active key cannot be retired: rotate first."""
    info = ring.get(kid)
    if info.status == "active":
        raise InvalidInput(f"{kid} is the active signing key: run `mcpbill keys rotate` first")
    retired = replace(info, status="retired", verify_until=None)
    ring.keys[kid] = retired
    return retired


def init_keyring(directory: Path, alg: str, *, now: datetime, force: bool) -> KeyRing:
    """A keyring with one new active key. Existing keys are refused unless ``force``; with it
    they are retired, not deleted: they verify no token any more, but the receipts and seals
    they signed still check against them (``reconcile --verify-receipts``).

    Where other processes may use the directory, hold :func:`ring_lock` from before this
    call until the ring is saved (as ``mcpbill init`` does)."""
    existing = KeyRing.exists(directory)
    if existing and not force:
        raise AlreadyExists(
            f"signing keys already exist in {directory}; pass --force to replace them "
            "(every token they signed stops verifying)"
        )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)
    ring = KeyRing.load(directory) if existing else KeyRing(directory, {})
    for kid, info in list(ring.keys.items()):
        ring.keys[kid] = replace(info, status="retired", verify_until=None)
    create_key(ring, alg, now=now)
    return ring


def _corrupt(path: Path, problem: str) -> KeyringCorrupt:
    return KeyringCorrupt(f"{path}: {problem}; restore the keys directory from a backup (tokens "
                          "and receipts its keys signed verify only with those keys)",
                          path=str(path))


def _entries(raw: Any, path: Path) -> list[Any]:
    entries = raw.get("keys") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise _corrupt(path, 'not a key ring (no "keys" list)')
    return entries


def _key_info(entry: Any, path: Path) -> KeyInfo:
    """One entry of ``keyring.json``, checked: its kid names a file, so it must be a plain name."""
    try:
        info = KeyInfo(**entry)
        if info.verify_until is not None and not datetime.fromisoformat(info.verify_until).tzinfo:
            raise ValueError("verify_until without a UTC offset")
    except (TypeError, ValueError):
        raise _corrupt(path, f"not a key entry: {entry!r}"[:200]) from None
    if (not isinstance(info.kid, str) or not _KID.fullmatch(info.kid)
            or info.alg not in ALGORITHMS or info.status not in STATUSES):
        raise _corrupt(path, f"not a key entry: {entry!r}"[:200])
    return info


# --- key material -------------------------------------------------------------------------------


def _key_path(directory: Path, kid: str, alg: str) -> Path:
    return directory / (f"{kid}.secret" if alg == "HS256" else f"{kid}.pem")


def _generate(alg: str) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if alg == "HS256":
        return secrets.token_bytes(MIN_HMAC_BYTES)
    private = ed25519.Ed25519PrivateKey.generate() if alg == "EdDSA" else (
        ec.generate_private_key(ec.SECP256R1()))
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def _load_private(directory: Path, info: KeyInfo) -> Any:
    path = _key_path(directory, info.kid, info.alg)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _corrupt(path, f"cannot read key {info.kid}: {exc.strerror or exc}") from None
    if info.alg == "HS256":
        if len(data) < MIN_HMAC_BYTES:
            raise InvalidInput(f"HS256 key {info.kid} is shorter than {MIN_HMAC_BYTES} bytes")
        return data
    return _pem_private(data, info, path)


def _pem_private(data: bytes, info: KeyInfo, path: Path) -> Any:
    """The private key in a PEM file, of the kind its ring entry says (never echoing a byte)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    kind = ed25519.Ed25519PrivateKey if info.alg == "EdDSA" else ec.EllipticCurvePrivateKey
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        private = None
    if not isinstance(private, kind):
        raise _corrupt(path, f"not an unencrypted {info.alg} private key (key {info.kid})")
    return private


def _public(directory: Path, info: KeyInfo) -> Any:
    private = _load_private(directory, info)
    return private if info.alg == "HS256" else private.public_key()


def _to_jwk(vk: VerificationKey) -> dict[str, Any]:
    from jwt.algorithms import ECAlgorithm, OKPAlgorithm

    algorithm = OKPAlgorithm if vk.alg == "EdDSA" else ECAlgorithm
    jwk: dict[str, Any] = algorithm.to_jwk(vk.key, as_dict=True)
    return {**jwk, "kid": vk.kid, "alg": vk.alg, "use": "sig"}


def keys_from_jwks(document: dict[str, Any]) -> dict[str, VerificationKey]:
    """Verification keys from a JWKS document (what a stateless verifier is given)."""
    from jwt import PyJWK
    from jwt.exceptions import PyJWTError

    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InvalidInput('not a JWKS document: expected {"keys": [{...}, ...]}')
    found: dict[str, VerificationKey] = {}
    for entry in entries:
        if entry.get("alg") not in ("EdDSA", "ES256") or not entry.get("kid"):
            continue
        try:
            jwk = PyJWK(entry)
        except (PyJWTError, ValueError) as exc:
            raise InvalidInput(f"JWKS key {str(entry['kid'])[:64]!r} is not a usable public "
                               f"key: {exc}") from None
        found[entry["kid"]] = VerificationKey(entry["kid"], entry["alg"], jwk.key)
    return found


class KeySource:
    """Keys for a long-running verifier. A directory source re-reads ``keyring.json`` when it
    changes (a rotation elsewhere), checking at most every ``check_interval`` seconds; a static
    source (a JWKS) never changes. ``generation`` moves whenever the keys did.
    """

    def __init__(self, *, directory: Path | None = None,
                 keys: dict[str, VerificationKey] | None = None,
                 check_interval: float = 1.0) -> None:
        import threading

        self.directory = directory
        self.generation = 0
        self._interval = check_interval
        self._next_check = 0.0
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._keys: dict[str, VerificationKey] = keys or {}
        self._signed_with: dict[str, VerificationKey] = self._keys
        self._signer: tuple[KeyInfo, Any] | None = None
        self._until = datetime.max.replace(tzinfo=UTC)
        if directory is not None:
            self._reload()

    @classmethod
    def from_jwks(cls, document: dict[str, Any]) -> KeySource:
        return cls(keys=keys_from_jwks(document))

    def verification_keys(self) -> dict[str, VerificationKey]:
        self._maybe_reload()
        return self._keys

    def receipt_keys(self) -> dict[str, VerificationKey]:
        """The keys a receipt or seal of this operator may be signed with: a key ring's every
        key (a receipt stays verifiable after its key is rotated out or retired, as
        ``mcpbill receipt verify`` checks it); a static source's keys as given."""
        self._maybe_reload()
        return self._signed_with

    def signer(self) -> tuple[KeyInfo, Any] | None:
        """The active key and its private key, or None for a source with public keys only."""
        self._maybe_reload()
        return self._signer

    def _maybe_reload(self) -> None:
        if self.directory is None or time.monotonic() < self._next_check:
            return
        with self._lock:
            self._next_check = time.monotonic() + self._interval
            stat = (self.directory / INDEX).stat()
            if (stat.st_mtime_ns, stat.st_size) != self._stamp or datetime.now(UTC) >= self._until:
                self._reload()

    def _reload(self) -> None:
        if self.directory is None:
            return
        stat = (self.directory / INDEX).stat()
        ring = KeyRing.load(self.directory)
        now = datetime.now(UTC)
        self._keys = ring.verification_keys(now)
        self._signed_with = ring.signature_keys()
        self._signer = ring.signing_key()
        # A verifying key lapses at its verify_until: reload then, even if the file is the same.
        lapses = [datetime.fromisoformat(k.verify_until) for k in ring.keys.values()
                  if k.status == "verifying" and k.verify_until and k.verifies_at(now)]
        self._until = min(lapses, default=datetime.max.replace(tzinfo=UTC))
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        self.generation += 1
