"""What one paid call costs the ledger, counted where the database reports it, not timed.

A paid call's cost is its statements and its commits (``bench/mcp_overhead.py`` and
``bench/verifier.py`` set them against the same rows written as raw SQL): one more statement
or one more transaction per call is a regression these tests catch whatever the machine's
load. SQLite reports every statement it runs to a trace callback; PostgreSQL's are read from
libpq's protocol trace (one ``CommandComplete`` per statement the server ran).
Receipts are signed without ``jwt.encode``'s per-call work, into the same bytes.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import jwt
import pytest
from sqlalchemy import Engine, event, text

from mcpbill_cli.keys import ALGORITHMS, KeyRing, init_keyring
from mcpbill_cli.ledger.credit import IssuedToken
from mcpbill_cli.ledger.engine import make_engine, reading, writing
from mcpbill_cli.receipts import sign_receipt, sign_refund_receipt, verify_receipt
from mcpbill_cli.verifier import Hold, Verifier

from .billing_support import FakeClock

HOLD = ["BEGIN", "UPDATE", "UPDATE", "INSERT", "INSERT", "INSERT", "COMMIT"]
# the call and its hold resolved, the capture transfer, both accounts settled, the receipt, the
# event
CAPTURE = ["BEGIN", "UPDATE", "UPDATE", "INSERT", "UPDATE", "UPDATE", "UPDATE", "INSERT",
           "COMMIT"]
# the guarded debit, the revenue credit, the transfer, the call with its receipt, the event
CHARGE = ["BEGIN", "UPDATE", "UPDATE", "INSERT", "INSERT", "INSERT", "COMMIT"]
REPLAY = ["BEGIN", "UPDATE", "UPDATE", "INSERT", "INSERT", "ROLLBACK", "BEGIN", "SELECT",
          "COMMIT"]


class StatementLog:
    """The statements ``engine``'s connections run, by verb (BEGIN, UPDATE, INSERT, COMMIT...),
    as the database driver reports them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self.sql: list[str] = []
        self.traced: list[tuple[Any, IO[bytes]]] = []  # PostgreSQL: (driver connection, file)
        event.listen(engine, "checkout", self._watch)

    def _watch(self, dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        if self.sqlite:
            dbapi_conn.set_trace_callback(self.sql.append)
        elif not any(conn is dbapi_conn for conn, _ in self.traced):
            import psycopg

            trace = tempfile.TemporaryFile()
            dbapi_conn.pgconn.trace(trace.fileno())
            dbapi_conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
            self.traced.append((dbapi_conn, trace))

    def take(self) -> list[str]:
        """The verbs run since the last take, in order (one connection at a time here)."""
        if self.sqlite:
            verbs = [sql.split(None, 1)[0].upper() for sql in self.sql]
            self.sql.clear()
            return verbs
        verbs = []
        for conn, trace in self.traced:
            conn.pgconn.untrace()  # flushes what libpq buffered
            trace.seek(0)
            for line in trace.read().decode().splitlines():
                fields = line.split("\t")
                if fields[:1] == ["B"] and fields[2:3] == ["CommandComplete"]:
                    verbs.append(fields[3].strip().strip('"').split()[0])
            trace.close()
        self.traced.clear()
        return verbs

    def close(self) -> None:
        """Stop watching (the verifier's close writes its last counts on new connections)
        and close the traces."""
        event.remove(self.engine, "checkout", self._watch)
        self.take()


@pytest.fixture
def statements(verifier: Verifier) -> Iterator[StatementLog]:
    assert verifier.engine is not None
    verifier.engine.dispose()  # every connection from here on is watched
    log = StatementLog(verifier.engine)
    yield log
    log.close()


def paid_call(verifier: Verifier, token: str) -> None:
    hold = verifier.begin(token, "search", args={"q": uuid.uuid4().hex})
    assert isinstance(hold, Hold) and hold.replayed is None
    verifier.capture(hold, result='{"content":[]}')


def test_a_paid_call_is_two_transactions_of_the_rows_it_writes(
        verifier: Verifier, new_token: Callable[..., IssuedToken],
        statements: StatementLog) -> None:
    token = new_token().token
    paid_call(verifier, token)  # the first call also records the pricing table's version
    statements.take()
    for _ in range(3):
        paid_call(verifier, token)
        assert statements.take() == HOLD + CAPTURE


def test_a_charge_is_one_transaction_of_the_rows_it_writes(
        verifier: Verifier, new_token: Callable[..., IssuedToken],
        statements: StatementLog) -> None:
    token = new_token().token
    verifier.charge(token, "search", idempotency_key="warm")
    statements.take()
    for number in range(3):
        receipt = verifier.charge(token, "search", idempotency_key=f"call-{number}")
        assert statements.take() == CHARGE
        assert verifier.verify_receipt(receipt.jws).receipt_id == receipt.receipt_id


def test_a_replay_writes_nothing_new(
        verifier: Verifier, new_token: Callable[..., IssuedToken],
        statements: StatementLog) -> None:
    """A repeat of a charged call reads its receipt back: the charge's transaction is rolled
    back at the call's row (its key is taken), then one transaction reads the stored call."""
    token = new_token().token
    first = verifier.charge(token, "search", idempotency_key="same")
    statements.take()
    again = verifier.charge(token, "search", idempotency_key="same")
    assert again.jws == first.jws
    assert statements.take() == REPLAY


def test_sqlite_writes_take_the_write_lock_up_front_and_reads_do_not(tmp_path: Path) -> None:
    """Every write transaction on SQLite begins IMMEDIATE (a conditional UPDATE never meets
    "database is locked" half way), reads a deferred BEGIN, also after an error."""
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    log = StatementLog(engine)
    with writing(engine) as conn:
        conn.execute(text("SELECT 1"))
    with reading(engine) as conn:
        conn.execute(text("SELECT 2"))
    with pytest.raises(ZeroDivisionError), reading(engine) as conn:
        conn.execute(text("SELECT 3"))
        raise ZeroDivisionError
    with writing(engine) as conn:
        conn.execute(text("SELECT 4"))
    assert log.sql == ["BEGIN IMMEDIATE", "SELECT 1", "COMMIT", "BEGIN", "SELECT 2", "COMMIT",
                       "BEGIN", "SELECT 3", "ROLLBACK", "BEGIN IMMEDIATE", "SELECT 4", "COMMIT"]
    engine.dispose()


CLAIMS = {"success": True, "transaction": "charge:rcpt_1", "network": "mcpbill:demo",
          "payer": "agent-1", "amount": "10000", "receiptId": "rcpt_1", "tool": "séarch",
          "amountUsd": "0.01", "asset": "USDC", "jti": "tok_1", "idempotencyKey": "k",
          "remainingUsd": "0.99", "pricingVersion": 1, "timestamp": "2026-01-01T00:00:00Z"}


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_receipts_are_the_jws_jwt_encode_writes(alg: str, tmp_path: Path,
                                                clock: FakeClock) -> None:
    ring = init_keyring(tmp_path / "keys", alg, now=clock(), force=False)
    ring.save()
    ring = KeyRing.load(tmp_path / "keys")
    info, key = ring.signing_key()
    for sign, typ in ((sign_receipt, "mcpbill-receipt+jwt"),
                      (sign_refund_receipt, "mcpbill-refund+jwt")):
        signed = sign(CLAIMS, kid=info.kid, alg=alg, key=key).jws
        expected = jwt.encode(CLAIMS, key, algorithm=alg, headers={"kid": info.kid, "typ": typ})
        if alg == "ES256":  # ECDSA signatures are randomized: the signed bytes must agree
            assert signed.rsplit(".", 1)[0] == expected.rsplit(".", 1)[0]
        else:
            assert signed == expected
        assert jwt.get_unverified_header(signed) == {"alg": alg, "kid": info.kid, "typ": typ}
    receipt = sign_receipt(CLAIMS, kid=info.kid, alg=alg, key=key)
    assert verify_receipt(receipt.jws, ring.verification_keys()).claims == CLAIMS


def test_paid_calls_of_one_thread_take_no_connection_from_the_pool_after_the_first(
        served: Verifier, new_token: Callable[..., IssuedToken]) -> None:
    """Each paid call's transactions run on a connection kept open between calls: no pool
    checkout and check-in per transaction (about 50 us of CPU each, measured)."""
    assert served.engine is not None
    token = new_token().token
    served.charge(token, "search", idempotency_key="warm")
    checkouts: list[object] = []
    event.listen(served.engine, "checkout", lambda *_: checkouts.append(_))
    for number in range(5):
        served.charge(token, "search", idempotency_key=f"call-{number}")
        paid_call(served, token)
    assert checkouts == []
    assert served.verify_receipt(served.charge(token, "search").jws).amount > 0
