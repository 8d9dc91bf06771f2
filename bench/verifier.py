"""The verifier's hot path against bare baselines, all measured in the same run.

Prints:
- preflight throughput / bare ``jwt.decode`` throughput for the same token and algorithm
  (target >= 0.8), for a token seen before (the usual case: an agent reuses its token) and
  for a token never seen before (every call a full signature check);
- ``charge`` throughput / a bare loop of one conditional UPDATE plus one INSERT per call in
  its own transaction, with the raw driver, on the same database (target >= 0.5), on SQLite
  and on PostgreSQL (skipped with a note if PostgreSQL is unreachable), for a live-mode
  verifier (every commit synced: SQLite ``synchronous=FULL``, PostgreSQL
  ``synchronous_commit=on``) against the bare loop synced the same way, and for a demo-mode
  one (``NORMAL``, ``off``) against the bare loop unsynced;
- ``charge`` throughput / its floor (goal >= 0.5), per backend and mode: the same rows a
  charge writes, as raw SQL on the raw driver (sqlite3, psycopg 3) on the same ledger, one
  transaction per charge synced as the verifier's, plus the receipt's Ed25519 signature (a
  JWS of the same claims, built by hand and signed with the key ring's key): see
  ``bench/floors.py``;
- what durability costs: live / demo charge throughput, beside the same ratio for the bare
  loops (the part of it the disk takes whatever code runs), and live / demo hold + capture p99;
- p50 and p99 latency of hold + capture, live and demo.

Live and demo alternate in ``--rounds`` rounds, so a busy moment of the machine weighs on both;
each throughput is the median round's.

Usage: python bench/verifier.py [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import jwt
from floors import ChargeFloor, PostgresChargeFloor, ReceiptSigner, SqliteChargeFloor

from mcpbill_cli import Quote, Verifier
from mcpbill_cli.clock import utcnow
from mcpbill_cli.config import load_settings
from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger import credit
from mcpbill_cli.ledger.engine import make_engine, writing
from mcpbill_cli.setup import initialize

PG_ADMIN = os.environ.get("MCPBILL_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PRICING = """version = 1
default_price = "0.000001"
[tools.search]
price = "0.000001"
"""


def rate(fn: Callable[[], object], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return count / (time.perf_counter() - start)


def make_home(root: Path, db_url: str) -> Any:
    settings = load_settings(home=root, db_url=db_url, mode="demo")
    initialize(settings, alg="EdDSA", mode="demo", force=False)
    settings.pricing_path.write_text(PRICING)
    return settings


def issue(settings: Any, limit: int) -> str:
    engine = make_engine(settings.db_url)
    signer = KeyRing.load(settings.keys_dir).signing_key()
    with writing(engine) as conn:
        credit.fund_demo(conn, "bench", limit, now=utcnow())
        token = credit.issue(conn, credit.IssueRequest(
            tenant="bench", agent="bench", limit=limit, ttl=3600, scope=None,
            audience=settings.audience, issuer=settings.issuer), signer=signer,
            ttl_cap=settings.ttl_cap, now=utcnow()).token
    engine.dispose()
    return token


def bench_preflight(settings: Any, count: int) -> None:
    tokens = [issue(settings, 1_000_000) for _ in range(count // 4)]
    ring = KeyRing.load(settings.keys_dir)
    key = ring.verification_keys()[ring.active().kid]
    verifier = Verifier.from_settings(settings)

    def bare(token: str) -> None:
        jwt.decode(token, key.key, algorithms=[key.alg], audience=settings.audience,
                   issuer=settings.issuer)

    hot = tokens[0]
    bare_rate = rate(lambda: bare(hot), count)
    warm_rate = rate(lambda: verifier.preflight(hot, "search"), count)
    cold = iter(tokens)
    cold_rate = rate(lambda: verifier.preflight(next(cold), "search"), len(tokens))
    print(f"bare jwt.decode (EdDSA)          {bare_rate:9.0f}/s")
    print(f"preflight, token seen before     {warm_rate:9.0f}/s  ratio {warm_rate / bare_rate:.2f}"
          "  (target >= 0.8)")
    print(f"preflight, token never seen      {cold_rate:9.0f}/s  ratio {cold_rate / bare_rate:.2f}"
          "  (signature check + ledger read every call)")
    verifier.close()


def bare_sqlite_loop(path: str, count: int, synced: bool) -> float:
    import sqlite3

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if synced else 'NORMAL'}")
    db.execute("CREATE TABLE IF NOT EXISTS b_acct (id TEXT PRIMARY KEY, bal INTEGER)")
    db.execute("CREATE TABLE IF NOT EXISTS b_xfer (id TEXT PRIMARY KEY, acct TEXT, amt INTEGER)")
    db.execute("INSERT OR REPLACE INTO b_acct VALUES ('a', ?)", (10**12,))

    def one() -> None:
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE b_acct SET bal = bal - 1 WHERE id = 'a' AND bal >= 1")
        db.execute("INSERT INTO b_xfer VALUES (?, 'a', 1)", (uuid.uuid4().hex,))
        db.execute("COMMIT")

    result = rate(one, count)
    db.close()
    return result


def bare_pg_loop(url: str, count: int, synced: bool) -> float:
    import psycopg

    with psycopg.connect(url, autocommit=False) as db:
        db.execute(f"SET synchronous_commit TO {'on' if synced else 'off'}")
        db.execute("CREATE TABLE IF NOT EXISTS b_acct (id TEXT PRIMARY KEY, bal BIGINT)")
        db.execute("CREATE TABLE IF NOT EXISTS b_xfer (id TEXT PRIMARY KEY, acct TEXT, amt BIGINT)")
        db.execute("INSERT INTO b_acct VALUES ('a', %s) ON CONFLICT (id) DO UPDATE SET bal = %s",
                   (10**12, 10**12))
        db.commit()

        def one() -> None:
            db.execute("UPDATE b_acct SET bal = bal - 1 WHERE id = 'a' AND bal >= 1")
            db.execute("INSERT INTO b_xfer VALUES (%s, 'a', 1)", (uuid.uuid4().hex,))
            db.commit()

        return rate(one, count)


MODES = (("live", True), ("demo", False))  # a verifier's mode, and whether its commits sync


@dataclass
class Tally:
    """One mode's measurements: a throughput per round of each loop, every latency."""

    bare: list[float] = field(default_factory=list)  # per second, one per round
    floor: list[float] = field(default_factory=list)
    charge: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # hold + capture, ms


# A charge's floor on the bench's ledger: whether its commits sync, the charge's signer and
# what it writes (floor_call) -> the floor.
FloorFor = Callable[..., ChargeFloor]


def bench_charge(label: str, settings: Any, bare: Callable[[bool, int], float],
                 floor_for: FloorFor, count: int, rounds: int) -> None:
    """Charge and hold+capture with a live (synced) and a demo verifier, each beside the bare
    loop and the charge's floor synced the same way."""
    token = issue(settings, 10**12)
    verifiers = {mode: Verifier.from_settings(settings, demo=not synced) for mode, synced in MODES}
    quote = verifiers["live"].preflight(token, "search")
    floors = {mode: floor_for(synced, **floor_call(settings, quote, demo=not synced))
              for mode, synced in MODES}
    tallies = {mode: Tally() for mode, _ in MODES}
    per_round = max(count // rounds, 1)
    for mode, _ in MODES:  # warm the pools and the statement caches (psycopg: prepared)
        for _ in range(10):
            charge(verifiers[mode], token)
            floors[mode].charge(uuid.uuid4().hex)
    for _ in range(rounds):
        for mode, synced in MODES:
            measure(tallies[mode], verifiers[mode], floors[mode], token, per_round,
                    lambda calls, synced=synced: bare(synced, calls))
    for mode, _ in MODES:
        verifiers[mode].close()
        floors[mode].close()
    for mode, synced in MODES:
        report(label, mode, "synced" if synced else "unsynced", tallies[mode])
    live, demo = tallies["live"], tallies["demo"]
    print(f"{label}: {'durability costs':32} charge live/demo "
          f"{median(live.charge) / median(demo.charge):.2f} (bare synced/unsynced "
          f"{median(live.bare) / median(demo.bare):.2f}), hold+capture p99 live/demo "
          f"{p99(live.latencies) / p99(demo.latencies):.2f}")


def floor_call(settings: Any, quote: Quote, *, demo: bool) -> dict[str, Any]:
    """What a floor needs to write a charge's rows and sign its receipt: the key ring's
    signing key, and the token, tenant, agent, tool and price that ``quote`` names."""
    info, key = KeyRing.load(settings.keys_dir).signing_key()
    return {"signer": ReceiptSigner(key, info.kid), "jti": quote.jti, "tenant": quote.tenant,
            "agent": quote.agent, "tool": quote.tool, "price": quote.amount,
            "rule": quote.price.rule, "version": quote.price.version, "demo": demo}


def measure(tally: Tally, verifier: Verifier, floor: ChargeFloor, token: str, calls: int,
            bare: Callable[[int], float]) -> None:
    """One round: the bare loop, the floor, ``calls`` charges, then half as many
    hold+capture."""
    tally.bare.append(bare(calls))
    tally.floor.append(rate(lambda: floor.charge(uuid.uuid4().hex), calls))
    tally.charge.append(rate(lambda: charge(verifier, token), calls))
    for _ in range(max(calls // 2, 25)):
        start = time.perf_counter()
        with verifier.call(token, "search", idempotency_key=uuid.uuid4().hex):
            pass
        tally.latencies.append((time.perf_counter() - start) * 1000)


def charge(verifier: Verifier, token: str) -> None:
    """A new charge: without a key of its own, a repeat within the dedupe window is a replay."""
    verifier.charge(token, "search", idempotency_key=uuid.uuid4().hex)


def report(label: str, mode: str, sync: str, tally: Tally) -> None:
    bare, floor, charges = median(tally.bare), median(tally.floor), median(tally.charge)
    print(f"{label}: {'bare UPDATE+INSERT, ' + sync:32} {bare:9.0f}/s")
    print(f"{label}: {'charge, ' + mode:32} {charges:9.0f}/s  ratio {charges / bare:.2f}"
          "  (target >= 0.5)")
    print(f"{label}: charge vs floor (same rows + signature)  {floor:.0f}/s  ratio "
          f"{charges / floor:.2f} (goal >= 0.5)")
    print(f"{label}: {'hold+capture, ' + mode:32} p50 {median(tally.latencies):.2f} ms"
          f"  p99 {p99(tally.latencies):.2f} ms")


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98]


def with_pg_database(fn: Callable[[str], None]) -> None:
    try:
        import psycopg

        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001 - any failure means no PostgreSQL to measure
        print(f"postgres: skipped ({exc.__class__.__name__}: {exc})")
        return
    name = f"mcpbill_bench_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        fn(PG_ADMIN.rsplit("/", 1)[0] + f"/{name}")
    finally:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4,
                        help="live and demo take turns this many times (default 4)")
    args = parser.parse_args()
    count, rounds = args.calls, args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = make_home(root / "sqlite", f"sqlite:///{root / 'sqlite' / 'ledger.db'}")
        bench_preflight(settings, count)
        ledger = str(root / "sqlite" / "ledger.db")
        bench_charge("sqlite", settings,
                     lambda synced, calls: bare_sqlite_loop(ledger, calls, synced),
                     lambda synced, **call: SqliteChargeFloor(ledger, synced=synced, **call),
                     count, rounds)

        def postgres(url: str) -> None:
            pg_settings = make_home(root / "pg", url.replace("postgresql://",
                                                             "postgresql+psycopg://"))
            bench_charge("postgres", pg_settings,
                         lambda synced, calls: bare_pg_loop(url, calls, synced),
                         lambda synced, **call: PostgresChargeFloor(url, synced=synced, **call),
                         count, rounds)

        with_pg_database(postgres)


if __name__ == "__main__":
    main()
