"""Paid calls per second as replicas are added: W processes sharing one PostgreSQL ledger.

A deployment scales out by running more server processes against one ledger; that only pays
if a charge's rows are the charger's own. This bench runs W = 1, 2, 4, 8 worker **processes**,
each with its own live-mode :class:`Verifier` (every commit synced) charging its own token
(all of one funded tenant) with unique arguments and keys, for ``--seconds`` after a common
start, and sums the charges per second. Beside each W it runs a floor under any billing code:
W processes writing, as hand-written SQL on the raw driver (psycopg 3, one synced transaction
per call), the rows a charge writes (the token's debit, the revenue credit, the transfer, the
call with its signed Ed25519 receipt, an event), each worker on rows of its own: its own token
and revenue accounts, and its events as plain INSERTs into a ``floor_events`` table with no
head row to lock. The floor rises with W as long as PostgreSQL's group commit and the cores
allow; mcpbill / floor should stay >= 0.6 and rise with it. A row every charge locks (a
shared revenue balance, an audit chain's head) holds mcpbill to one commit at a time instead.

Then a flood: W = 4 paid workers alone, and again beside two processes sending garbage
(random strings, JWTs signed by a key the ledger does not know, under an unknown kid and under
the real one) through ``preflight`` at up to ``--flood-rate`` per second in total. Paid
throughput with the flood / without should stay >= 0.9; the garbage rate reached is printed.

Every run makes its own database (``mcpbill_bench_<pid>_<hex>``) on the ``--pg-url`` server
and drops it at the end, on failure too.

Floor and mcpbill take turns in ``--rounds`` rounds per width (so do the flood's two
halves), each in fresh processes, and the median round counts: this disk's commit latency
drifts by 2x over minutes. Each line also gives the client CPU per call (the worker processes'
own, PostgreSQL's not included): with fewer cores than processes, that is what runs out.

Usage: python bench/scaleout.py [--workers 1,2,4,8] [--seconds 5] [--rounds 3]
                                [--flood-rate 2000] [--pg-url URL] [--skip-flood | --flood-only]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import multiprocessing
import os
import queue
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy.engine import make_url

from mcpbill_cli import Verifier
from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import KeyRing, KeySource, init_keyring
from mcpbill_cli.ledger import credit
from mcpbill_cli.ledger.engine import make_engine, writing
from mcpbill_cli.ledger.schema import upgrade
from mcpbill_cli.tokens import Claims, encode_token, new_jti

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PRICING = """version = 1
[tools.search]
price = "0.000001"
"""
TOOL = "search"
TOKEN_LIMIT = 10**10  # micro-USDC per token: far more than any run spends
FLOOD_WORKERS = 2
FLOOD_WIDTH = 4  # paid workers in the flood rounds
PACING_TICK = 0.02  # seconds between a paced loop's bursts
SETUP_TIMEOUT = 120.0  # seconds a process may take to import, connect and warm up


@dataclass(frozen=True)
class Ledger:
    """What every worker process needs: the bench database, the keys, the prices, the tokens."""

    db_url: str  # SQLAlchemy URL of the throwaway database
    keys_dir: Path
    pricing: Path
    tokens: tuple[str, ...]  # one per paid worker


@dataclass(frozen=True)
class Result:
    """What one worker process did in one round."""

    kind: str  # floor | mcpbill | flood
    calls: int  # that went as they should (for the flood: garbage refused)
    seconds: float
    cpu: float  # seconds of CPU the process used meanwhile, all its threads
    failed: int  # calls that did not (for the flood: garbage accepted, which must never happen)


@dataclass
class Tally:
    """One kind of worker over the rounds: throughput of each round (summed over its
    processes), and the calls and CPU seconds of all of them."""

    rates: list[float] = field(default_factory=list)
    calls: int = 0
    cpu: float = 0.0
    failed: int = 0

    def add(self, results: list[Result], kind: str) -> None:
        mine = [result for result in results if result.kind == kind]
        self.rates.append(sum(result.calls / result.seconds for result in mine))
        self.calls += sum(result.calls for result in mine)
        self.cpu += sum(result.cpu for result in mine)
        self.failed += sum(result.failed for result in mine)
        if self.failed:
            print(f"warning: {self.failed} {kind} calls did not go as expected",
                  file=sys.stderr)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_per_call(self) -> float:
        """Microseconds of client CPU per call (the worker processes, not PostgreSQL)."""
        return self.cpu / max(self.calls, 1) * 1e6


# --- the database -----------------------------------------------------------------------------


def driver_url(url: str) -> str:
    """``url`` for psycopg itself (no ``+psycopg`` driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def throwaway_database(admin_url: str) -> Iterator[str]:
    """A new database on ``admin_url``'s server, dropped on the way out whatever happened."""
    name = f"mcpbill_bench_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(driver_url(admin_url), autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def prepare(db_url: str, home: Path, workers: int) -> Ledger:
    """Migrate the ledger, make a key ring and a price list, fund a tenant, issue its tokens,
    and give each floor worker its accounts and the floor its events table."""
    engine = make_engine(db_url)
    upgrade(engine)
    keys_dir = home / "keys"
    init_keyring(keys_dir, "EdDSA", now=utcnow(), force=False).save()
    pricing = home / "pricing.toml"
    pricing.write_text(PRICING)
    signer = KeyRing.load(keys_dir).signing_key()
    with writing(engine) as conn:
        credit.fund_demo(conn, "bench", TOKEN_LIMIT * workers, now=utcnow())
        tokens = tuple(issue(conn, signer) for _ in range(workers))
    engine.dispose()
    with psycopg.connect(driver_url(db_url)) as db:
        create_floor_rows(db, workers)
    return Ledger(db_url, keys_dir, pricing, tokens)


def issue(conn: Any, signer: Any) -> str:
    return credit.issue(conn, credit.IssueRequest(
        tenant="bench", agent="bench", limit=TOKEN_LIMIT, ttl=3600, scope=None,
        audience="mcpbill", issuer="mcpbill"), signer=signer, ttl_cap=86400,
        now=utcnow()).token


_FLOOR_EVENTS = """CREATE TABLE floor_events (
    id BIGSERIAL PRIMARY KEY, at TIMESTAMPTZ NOT NULL, kind VARCHAR(24) NOT NULL,
    jti VARCHAR(64), tenant VARCHAR(100), agent VARCHAR(200), tool VARCHAR(200),
    amount BIGINT, ref VARCHAR(200), demo BOOLEAN NOT NULL, hash VARCHAR(64) NOT NULL)"""
_FLOOR_ACCOUNT = (
    "INSERT INTO accounts (id, kind, guarded, closed, debits_posted, credits_posted, "
    "debits_pending, credits_pending, created_at) VALUES (%s, %s, %s, false, 0, %s, 0, 0, now())")


def create_floor_rows(db: psycopg.Connection[Any], workers: int) -> None:
    db.execute(_FLOOR_EVENTS)
    db.execute("CREATE INDEX ix_floor_events_at ON floor_events (at)")  # as ix_events_at
    for worker in range(workers):
        db.execute(_FLOOR_ACCOUNT, (f"floor_token:{worker}", "token", True, TOKEN_LIMIT))
        db.execute(_FLOOR_ACCOUNT, (f"floor_revenue:{worker}", "revenue", False, 0))


# --- running processes side by side -------------------------------------------------------------


Job = tuple[Callable[..., None], tuple[Any, ...]]  # a worker function and its arguments


def run_together(jobs: list[Job], seconds: float) -> list[Result]:
    """Start every job in its own spawned process; they start measuring together once all are
    ready, and each reports one Result."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(jobs)), context.Queue()
    processes = [context.Process(target=target, args=(*args, seconds, barrier, results))
                 for target, args in jobs]
    for process in processes:
        process.start()
    try:
        return collect(results, processes, time.monotonic() + SETUP_TIMEOUT + seconds)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.exitcode is None:
                process.terminate()


def collect(results: Any, processes: list[Any], deadline: float) -> list[Result]:
    """One Result per process; fails as soon as one of them died (its traceback is above)."""
    collected: list[Result] = []
    while len(collected) < len(processes):
        try:
            collected.append(results.get(timeout=0.5))
        except queue.Empty:
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"a worker process failed (exit codes {dead})") from None
    return collected


def tight_loop(call: Callable[[int], bool], seconds: float) -> tuple[int, int]:
    """(successes, failures) of ``call(n)`` called in a tight loop for ``seconds``."""
    deadline, done, failed = time.perf_counter() + seconds, 0, 0
    while time.perf_counter() < deadline:
        if call(done + failed):
            done += 1
        else:
            failed += 1
    return done, failed


def paced_loop(call: Callable[[int], bool], per_second: float, seconds: float
               ) -> tuple[int, int]:
    """As :func:`tight_loop`, but never faster than ``per_second``: the calls due are sent in
    a burst every ``PACING_TICK`` seconds, with a sleep between. Sleeping before each call
    instead (1,000 wake-ups a second) cost the sender more CPU than the calls it sent."""
    start = time.perf_counter()
    end = start + seconds
    sent = failed = 0
    while True:
        now = time.perf_counter()
        due = int((min(now, end) - start) * per_second)  # calls the rate allows by now
        while sent < due:
            failed += not call(sent)
            sent += 1
        if now >= end:
            return sent - failed, failed
        time.sleep(min(PACING_TICK, end - now))


def measured(kind: str, loop: Callable[[], tuple[int, int]], barrier: Any, results: Any
             ) -> None:
    """Wait for every process of the round, run ``loop``, report what it did and cost."""
    barrier.wait(timeout=SETUP_TIMEOUT)
    wall, cpu = time.perf_counter(), time.process_time()
    done, failed = loop()
    results.put(Result(kind, done, time.perf_counter() - wall, time.process_time() - cpu,
                       failed))


# --- the workers (each in a process of its own) -------------------------------------------------


def verifier_for(ledger: Ledger) -> Verifier:
    """A live-mode verifier, as a replica builds it: every commit synced before it returns."""
    return Verifier(keys=KeySource(directory=ledger.keys_dir), pricing=ledger.pricing,
                    db_url=ledger.db_url)


def paid_worker(ledger: Ledger, worker: int, seconds: float, barrier: Any, results: Any
                ) -> None:
    """Charge this worker's own token, every call a new one (unique arguments and key)."""
    verifier = verifier_for(ledger)
    token, tag = ledger.tokens[worker], f"{worker}-{secrets.token_hex(4)}"

    def charge(n: int) -> bool:
        try:
            verifier.charge(token, TOOL, args={"n": f"{tag}-{n}"},
                            idempotency_key=f"scale-{tag}-{n}")
        except BillingError:
            return False
        return True

    charge(-1)  # warm up: the pricing version recorded, a pooled connection, statements
    measured("mcpbill", lambda: tight_loop(charge, seconds), barrier, results)
    verifier.close()


def floor_worker(ledger: Ledger, worker: int, seconds: float, barrier: Any, results: Any
                 ) -> None:
    """The rows a charge writes, on rows of this worker's own, as raw SQL: see FloorCharge."""
    info, signer = KeyRing.load(ledger.keys_dir).signing_key()
    with psycopg.connect(driver_url(ledger.db_url), application_name="scaleout-floor") as db:
        db.execute("SET synchronous_commit TO on")  # as a live verifier's connections
        db.commit()
        floor = FloorCharge(db, signer, info.kid, worker)
        floor.charge(-1)
        measured("floor", lambda: tight_loop(floor.charge, seconds), barrier, results)


def flood_worker(ledger: Ledger, per_second: float, seconds: float, barrier: Any,
                 results: Any) -> None:
    """Send garbage tokens through preflight at ``per_second``; each must be refused."""
    verifier = verifier_for(ledger)
    garbage = garbage_tokens(KeyRing.load(ledger.keys_dir).active().kid, 300)

    def refused(n: int) -> bool:
        try:
            verifier.preflight(garbage[n % len(garbage)], TOOL)
        except BillingError:
            return True
        return False

    measured("flood", lambda: paced_loop(refused, per_second, seconds), barrier, results)
    verifier.close()


def garbage_tokens(real_kid: str, count: int) -> list[str]:
    """Random strings (some JWT-shaped), and well-formed tokens signed by a key the ledger does
    not know: under an unknown kid (refused before any signature check) and under the real
    kid (refused by the signature check)."""
    stranger = ed25519.Ed25519PrivateKey.generate()
    now = datetime.now(UTC)
    made: list[str] = []
    for n in range(count):
        kid = real_kid if n % 4 == 3 else f"unknown-{secrets.token_hex(4)}"
        claims = Claims(jti=new_jti(), tenant="bench", agent="mallory", scope=("*",),
                        audience="mcpbill", issuer="mcpbill", issued_at=now, not_before=now,
                        expires_at=now + timedelta(hours=1), limit=10**6, kid=kid)
        made.append([secrets.token_urlsafe(48),
                     ".".join(secrets.token_urlsafe(30) for _ in range(3)),
                     encode_token(claims, "EdDSA", stranger),
                     encode_token(claims, "EdDSA", stranger)][n % 4])
    return made


# --- the floor ----------------------------------------------------------------------------------


_DEBIT = ("UPDATE accounts SET debits_posted = debits_posted + %(amount)s WHERE id = %(token)s "
          "AND closed IS false AND credits_posted - debits_posted - debits_pending >= %(amount)s "
          "RETURNING credits_posted - debits_posted - debits_pending")
_CREDIT = ("UPDATE accounts SET credits_posted = credits_posted + %(amount)s "
           "WHERE id = %(revenue)s")
_TRANSFER = (
    "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind, pending_id, "
    "status, timeout_at, code, ref, demo, created_at) VALUES (%(transfer)s, %(token)s, "
    "%(revenue)s, %(amount)s, 'posted', NULL, NULL, NULL, 'charge', %(call)s, false, %(at)s)")
_CALL = (
    "INSERT INTO calls (id, idempotency_key, request_hash, jti, tenant, agent, tool, units, "
    "amount_held, amount, status, transfer_id, timeout_at, pricing_version, price_rule, "
    "receipt, demo, created_at, resolved_at, key_retired) VALUES (%(call)s, %(call)s, "
    "%(digest)s, %(jti)s, 'floor', 'bench', 'search', NULL, %(amount)s, %(amount)s, "
    "'captured', %(transfer)s, NULL, 1, 'tools.search', %(receipt)s, false, %(at)s, %(at)s, "
    "false)")
_EVENT = (
    "INSERT INTO floor_events (at, kind, jti, tenant, agent, tool, amount, ref, demo, hash) "
    "VALUES (%(at)s, 'charge', %(jti)s, 'floor', 'bench', 'search', %(amount)s, %(call)s, "
    "false, %(hash)s)")


class FloorCharge:
    """The least work a charge needs with no shared row, one synced transaction per call: the
    guarded debit of the worker's token account, the credit of its own revenue account, the
    transfer, the call with a signed receipt, and an event (hashed, but chained only through
    this worker's memory: no head row). The driver prepares the statements after five uses."""

    def __init__(self, db: psycopg.Connection[Any], signer: Any, kid: str, worker: int
                 ) -> None:
        self.db, self.signer, self.cursor = db, signer, db.cursor()
        self.header = _b64(json.dumps({"alg": "EdDSA", "kid": kid,
                                       "typ": "mcpbill-receipt+jwt"}).encode())
        self.jti = f"floor{worker}_{secrets.token_hex(8)}"
        self.accounts = {"token": f"floor_token:{worker}", "revenue": f"floor_revenue:{worker}"}
        self.last_hash = "0" * 64

    def charge(self, n: int) -> bool:
        call = f"rcpt_{time.time_ns():016x}{secrets.token_hex(6)}"
        row = {**self.accounts, "call": call, "jti": self.jti, "amount": 1,
               "transfer": f"charge:{call}", "at": datetime.now(UTC),
               "digest": hashlib.sha256(f"{self.jti}{n}".encode()).hexdigest()}
        remaining = self.cursor.execute(_DEBIT, row).fetchone()[0]  # type: ignore[index]
        self.cursor.execute(_CREDIT, row)
        self.cursor.execute(_TRANSFER, row)
        self.cursor.execute(_CALL, {**row, "receipt": self.receipt(call, remaining)})
        self.last_hash = hashlib.sha256(f"{self.last_hash}charge{call}".encode()).hexdigest()
        self.cursor.execute(_EVENT, {**row, "hash": self.last_hash})
        self.db.commit()
        return True

    def receipt(self, call: str, remaining: int) -> str:
        """A JWS of a receipt's claims, built by hand and signed with the ring's Ed25519 key."""
        claims = {"success": True, "transaction": f"charge:{call}", "network": "mcpbill:ledger",
                  "payer": "bench", "amount": "1", "receiptId": call, "tool": TOOL,
                  "amountUsd": "0.000001", "asset": "USDC", "jti": self.jti, "tenant": "floor",
                  "idempotencyKey": call, "remainingUsd": str(remaining),
                  "pricingVersion": 1, "priceRule": "tools.search", "demo": False,
                  "timestamp": datetime.now(UTC).isoformat()}
        signing_input = f"{self.header}.{_b64(json.dumps(claims).encode())}"
        return f"{signing_input}.{_b64(self.signer.sign(signing_input.encode()))}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()



# --- the rounds ---------------------------------------------------------------------------------


def scale_out(ledger: Ledger, widths: list[int], seconds: float, rounds: int) -> None:
    print("W  floor/s  mcpbill/s  ratio (goal >= 0.6, rising with W as the floor does)")
    for width in widths:
        floor, paid = Tally(), Tally()
        for _ in range(rounds):  # taking turns, so a slow moment of the disk hits both
            floor.add(run_together([(floor_worker, (ledger, w)) for w in range(width)],
                                   seconds), "floor")
            paid.add(run_together([(paid_worker, (ledger, w)) for w in range(width)],
                                  seconds), "mcpbill")
        print(f"{width:<2} {floor.rate:8.0f} {paid.rate:10.0f}  {paid.rate / floor.rate:5.2f}"
              f"   client CPU per call: floor {floor.cpu_per_call:4.0f} us, "
              f"mcpbill {paid.cpu_per_call:4.0f} us")


def flood(ledger: Ledger, per_second: float, seconds: float, rounds: int) -> None:
    paid = [(paid_worker, (ledger, w)) for w in range(FLOOD_WIDTH)]
    garbage = [(flood_worker, (ledger, per_second / FLOOD_WORKERS))] * FLOOD_WORKERS
    alone, beside, refused = Tally(), Tally(), Tally()
    for _ in range(rounds):
        alone.add(run_together(paid, seconds), "mcpbill")
        results = run_together(paid + garbage, seconds)
        beside.add(results, "mcpbill")
        refused.add(results, "flood")
    print(f"flood: W={FLOOD_WIDTH} paid alone {alone.rate:.0f}/s, beside the flood "
          f"{beside.rate:.0f}/s, ratio {beside.rate / alone.rate:.2f} (goal >= 0.9); "
          f"client CPU per paid call {alone.cpu_per_call:.0f} us alone, "
          f"{beside.cpu_per_call:.0f} us beside")
    print(f"flood: garbage refused {refused.rate:.0f}/s by {FLOOD_WORKERS} processes "
          f"(target {per_second:.0f}/s), {refused.cpu_per_call:.0f} us CPU each, "
          f"{refused.cpu / (rounds * seconds):.2f} of the {os.cpu_count()} CPUs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4,8", help="widths to run (default 1,2,4,8)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per round (default 5)")
    parser.add_argument("--flood-rate", type=float, default=2000.0,
                        help="garbage calls per second to aim for, in total (default 2000)")
    parser.add_argument("--pg-url", default=PG_ADMIN, help=f"admin URL (default {PG_ADMIN})")
    parser.add_argument("--rounds", type=int, default=3,
                        help="floor and mcpbill (alone and flooded) take turns this many "
                             "times per width; the median round counts (default 3)")
    parser.add_argument("--skip-flood", action="store_true")
    parser.add_argument("--flood-only", action="store_true",
                        help="run only the flood rounds, not the widths")
    args = parser.parse_args()
    widths = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="mcpbill-scaleout-") as home, \
            throwaway_database(args.pg_url) as db_url:
        ledger = prepare(db_url, Path(home), max(*widths, FLOOD_WIDTH))
        print(f"PostgreSQL, live mode (synced commits), {args.rounds} rounds of "
              f"{args.seconds:g} s per width, median round, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f} at start")
        if not args.flood_only:
            scale_out(ledger, widths, args.seconds, args.rounds)
        if not args.skip_flood:
            flood(ledger, args.flood_rate, args.seconds, args.rounds)


if __name__ == "__main__":
    main()
