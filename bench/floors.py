"""Floors under billing code: the rows a billed call writes, as raw SQL on the raw driver.

A floor is the least work a job needs, so that a bench can print its ratio beside it
(``bench/verifier.py`` prints these). Here: one :meth:`Verifier.charge
<mcpbill_cli.Verifier.charge>` of a one-thread caller, on the same ledger, in one transaction
per charge, with the connection set up and synced as the verifier sets up its own
(:func:`mcpbill_cli.ledger.engine.make_engine`). Per charge it writes exactly what
``calls.debit_charge`` and ``calls.record_charge`` write:

- the token account's guarded debit (``UPDATE ... RETURNING`` what remains),
- the credit of the token's revenue account (``revenue:<jti>``),
- the posted transfer,
- the call's row with its signed receipt,
- the ``charge`` event (a plain INSERT: a sealer hashes it later, off the call);

and signs the receipt between the debit and the call's row, as the verifier does: the same
claims (so a receipt of the same size) with the same Ed25519 key, as a JWS built by hand
(PyJWT's header and compact JSON, then the raw ``cryptography`` key's ``sign``), not through
``jwt.encode``. No reads, no checks, no replay handling, nothing of mcpbill in the way: the
drivers (sqlite3, psycopg 3) with their statement caches warm (psycopg prepares a statement
on its fifth use).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

from mcpbill_cli.ledger.checkpoint import BACKSTOP_PAGES

RECEIPT_TYPE = "mcpbill-receipt+jwt"


class ReceiptSigner:
    """Receipts as the verifier signs them: a compact JWS (EdDSA) of the receipt's claims."""

    def __init__(self, key: Any, kid: str) -> None:
        self.key = key  # the key ring's Ed25519PrivateKey
        # As PyJWT writes it: alg and typ, then the extra headers, keys sorted, compact.
        self.header = _b64(json.dumps({"alg": "EdDSA", "kid": kid, "typ": RECEIPT_TYPE},
                                      separators=(",", ":"), sort_keys=True).encode())

    def sign(self, claims: dict[str, Any]) -> str:
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{self.header}.{payload}"
        return f"{signing_input}.{_b64(self.key.sign(signing_input.encode()))}"


class ChargeFloor:
    """What every floor shares: the token's accounts, the price, and the receipt's claims.

    ``tool``, ``price`` (micro-USDC), ``rule`` and ``version`` are the priced tool's, so the
    rows and the receipt are those a charge of it writes.
    """

    def __init__(self, signer: ReceiptSigner, *, jti: str, tenant: str, agent: str,
                 tool: str, price: int, rule: str, version: int, demo: bool) -> None:
        self.signer, self.demo = signer, demo
        self.jti, self.tenant, self.agent = jti, tenant, agent
        self.tool, self.price, self.rule, self.version = tool, price, rule, version
        self.token, self.revenue = f"token:{jti}", f"revenue:{jti}"
        self.network = "mcpbill:demo" if demo else "mcpbill:ledger"

    def charge(self, key: str) -> None:
        """One charge's rows and receipt under idempotency ``key``, in one transaction."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def receipt(self, call: str, key: str, remaining: int, at: datetime) -> str:
        return self.signer.sign({
            "success": True, "transaction": f"charge:{call}", "network": self.network,
            "payer": self.agent, "amount": str(self.price), "receiptId": call,
            "tool": self.tool, "amountUsd": _usd(self.price), "asset": "USDC", "jti": self.jti,
            "tenant": self.tenant, "idempotencyKey": key, "remainingUsd": _usd(remaining),
            "pricingVersion": self.version, "priceRule": self.rule, "demo": self.demo,
            "timestamp": at.isoformat().replace("+00:00", "Z")})


# --- SQLite -------------------------------------------------------------------------------------

_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"  # as SQLAlchemy stores a DateTime in SQLite
_SQLITE_DEBIT = (
    "UPDATE accounts SET debits_posted = debits_posted + ? WHERE id = ? AND closed IS 0 "
    "AND credits_posted - debits_posted - debits_pending >= ? "
    "RETURNING credits_posted - debits_posted - debits_pending")
_SQLITE_CREDIT = "UPDATE accounts SET credits_posted = credits_posted + ? WHERE id = ?"
_SQLITE_TRANSFER = (
    "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind, pending_id, "
    "status, timeout_at, code, ref, demo, created_at) "
    "VALUES (?, ?, ?, ?, 'posted', NULL, NULL, NULL, 'charge', ?, ?, ?)")
_SQLITE_CALL = (
    "INSERT INTO calls (id, idempotency_key, request_hash, jti, tenant, agent, tool, units, "
    "amount_held, amount, status, transfer_id, timeout_at, pricing_version, price_rule, "
    "receipt, demo, created_at, key_retired, resolved_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, 'captured', ?, NULL, ?, ?, ?, ?, ?, 0, ?)")
_SQLITE_EVENT = (
    "INSERT INTO events (at, kind, jti, tenant, agent, tool, amount, ref, demo) "
    "VALUES (?, 'charge', ?, ?, ?, ?, ?, ?, ?)")


class SqliteChargeFloor(ChargeFloor):
    """A charge's rows on a SQLite ledger file, one ``BEGIN IMMEDIATE`` transaction each, on a
    connection set up as the verifier's: WAL, foreign keys on, ``synchronous=FULL`` when
    ``synced`` (a live verifier) else ``NORMAL`` (a demo one), its checkpoint backstop."""

    def __init__(self, path: str, signer: ReceiptSigner, *, synced: bool, **call: Any) -> None:
        super().__init__(signer, **call)
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        for pragma in ("journal_mode=WAL", "busy_timeout=30000", "foreign_keys=ON",
                       f"synchronous={'FULL' if synced else 'NORMAL'}",
                       f"wal_autocheckpoint={BACKSTOP_PAGES}"):
            self.db.execute(f"PRAGMA {pragma}")
        self.cursor = self.db.cursor()

    def charge(self, key: str) -> None:
        call, at = _call_id(), datetime.now(UTC)
        stamp, transfer = at.strftime(_SQLITE_TIME), f"charge:{call}"
        demo, price, run = self.demo, self.price, self.cursor.execute
        run("BEGIN IMMEDIATE")
        (remaining,) = run(_SQLITE_DEBIT, (price, self.token, price)).fetchone()
        run(_SQLITE_CREDIT, (price, self.revenue))
        run(_SQLITE_TRANSFER, (transfer, self.token, self.revenue, price, call, demo, stamp))
        run(_SQLITE_CALL, (call, key, _digest(key), self.jti, self.tenant, self.agent,
                           self.tool, price, price, transfer, self.version, self.rule,
                           self.receipt(call, key, remaining, at), demo, stamp, stamp))
        run(_SQLITE_EVENT, (stamp, self.jti, self.tenant, self.agent, self.tool, price, call,
                            demo))
        run("COMMIT")

    def close(self) -> None:
        self.db.close()


# --- PostgreSQL ---------------------------------------------------------------------------------

_PG_DEBIT = _SQLITE_DEBIT.replace("?", "%s").replace("closed IS 0", "closed IS false")
_PG_CREDIT = _SQLITE_CREDIT.replace("?", "%s")
_PG_TRANSFER = _SQLITE_TRANSFER.replace("?", "%s")
_PG_CALL = _SQLITE_CALL.replace("?", "%s").replace(", 0, %s)", ", false, %s)")
_PG_EVENT = _SQLITE_EVENT.replace("?", "%s")


class PostgresChargeFloor(ChargeFloor):
    """A charge's rows on a PostgreSQL ledger (psycopg 3, ``url`` without a ``+driver``), one
    transaction each, with ``synchronous_commit`` on when ``synced`` (a live verifier) else
    off (a demo one)."""

    def __init__(self, url: str, signer: ReceiptSigner, *, synced: bool, **call: Any) -> None:
        import psycopg  # only where PostgreSQL is measured, as bench/verifier.py imports it

        super().__init__(signer, **call)
        self.db = psycopg.connect(url, autocommit=False)
        self.db.execute(f"SET synchronous_commit TO {'on' if synced else 'off'}")
        self.db.commit()
        self.cursor = self.db.cursor()

    def charge(self, key: str) -> None:
        call, at = _call_id(), datetime.now(UTC)
        transfer, demo, price, run = f"charge:{call}", self.demo, self.price, self.cursor.execute
        (remaining,) = run(_PG_DEBIT, (price, self.token, price)).fetchone()  # type: ignore[misc]
        run(_PG_CREDIT, (price, self.revenue))
        run(_PG_TRANSFER, (transfer, self.token, self.revenue, price, call, demo, at))
        run(_PG_CALL, (call, key, _digest(key), self.jti, self.tenant, self.agent, self.tool,
                       price, price, transfer, self.version, self.rule,
                       self.receipt(call, key, remaining, at), demo, at, at))
        run(_PG_EVENT, (at, self.jti, self.tenant, self.agent, self.tool, price, call, demo))
        self.db.commit()

    def close(self) -> None:
        self.db.close()


# --- the values a charge computes ---------------------------------------------------------------


def _call_id() -> str:
    """A receipt id that sorts by time, as the ledger makes them (new rows at the right edge
    of the indexes on ``calls.id`` and ``transfers.id``)."""
    return f"rcpt_{time.time_ns():016x}{secrets.token_hex(6)}"


def _digest(key: str) -> str:
    """A request hash: one SHA-256, as the verifier takes of the call's canonical form."""
    return hashlib.sha256(key.encode()).hexdigest()


def _usd(micro: int) -> str:
    whole, frac = divmod(micro, 1_000_000)
    return f"{whole}.{f'{frac:06d}'.rstrip('0').ljust(2, '0')}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
