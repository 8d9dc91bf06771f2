"""The verifier's hot path against bare baselines, all measured in the same run.

Prints:
- preflight throughput / bare ``jwt.decode`` throughput for the same token and algorithm
  (target >= 0.8), for a token seen before (the usual case: an agent reuses its token) and
  for a token never seen before (every call a full signature check);
- ``charge`` throughput / a bare loop of one conditional UPDATE plus one INSERT per call in
  its own transaction, with the raw driver, on the same database (target >= 0.5), on SQLite
  and on PostgreSQL (skipped with a note if PostgreSQL is unreachable);
- p50 and p99 latency of hold + capture.

Usage: python bench/verifier.py [--calls N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt

from mcpbill_cli import Verifier
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


def bare_sqlite_loop(path: str, count: int) -> float:
    import sqlite3

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
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


def bare_pg_loop(url: str, count: int) -> float:
    import psycopg

    with psycopg.connect(url, autocommit=False) as db:
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


def bench_charge(label: str, settings: Any, bare_rate: float, count: int) -> None:
    token = issue(settings, 10**12)
    verifier = Verifier.from_settings(settings)
    verifier.charge(token, "search")  # warm the pool and the statement cache
    charge_rate = rate(lambda: verifier.charge(token, "search"), count)
    latencies = []
    for _ in range(max(count // 2, 50)):
        start = time.perf_counter()
        with verifier.call(token, "search"):
            pass
        latencies.append((time.perf_counter() - start) * 1000)
    p50, p99 = statistics.median(latencies), statistics.quantiles(latencies, n=100)[98]
    print(f"{label}: bare UPDATE+INSERT      {bare_rate:9.0f}/s")
    print(f"{label}: charge                  {charge_rate:9.0f}/s  ratio "
          f"{charge_rate / bare_rate:.2f}  (target >= 0.5)")
    print(f"{label}: hold+capture latency    p50 {p50:.2f} ms  p99 {p99:.2f} ms")
    verifier.close()


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
    count = parser.parse_args().calls
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = make_home(root / "sqlite", f"sqlite:///{root / 'sqlite' / 'ledger.db'}")
        bench_preflight(settings, count)
        bare = bare_sqlite_loop(str(root / "sqlite" / "ledger.db"), count)
        bench_charge("sqlite", settings, bare, count)

        def postgres(url: str) -> None:
            pg_settings = make_home(root / "pg", url.replace("postgresql://",
                                                             "postgresql+psycopg://"))
            bench_charge("postgres", pg_settings, bare_pg_loop(url, count), count)

        with_pg_database(postgres)


if __name__ == "__main__":
    main()
