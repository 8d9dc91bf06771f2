"""Soak: paid calls for a set time, with sealing, sweeps and reconciles beside them; nothing may
grow without bound.

``--workers`` processes each run a live-mode :class:`Verifier` (every commit synced, its sealer
thread sealing the audit trail as a replica's does) charging its own token at ``--rate`` calls
per second, every call with new arguments and a new idempotency key. Beside them the real CLI
runs as an operator's cron would: every ``SWEEP_EVERY`` s a short-lived token is issued
(`mcpbill token issue --ttl 5s`) and `mcpbill token sweep` releases the expired ones; every
``RECONCILE_EVERY`` s `mcpbill reconcile --from <the last one's end> --to <now - SETTLED>`
checks what came since the last one, as an operator's job that runs through the day does. A
reconcile leaves a snapshot of the sums for the next to start from only at a window's end that
has settled (``reconcile.snapshots.SETTLED``, 5 minutes: later, a transfer dated before it may
still commit), so the windows end that far back, and none runs in a run's first minutes. Each
then starts from the snapshot the one before left and does the same work; a reconcile that
grew with the ledger (re-reading history) shows as reconciles that take longer and longer.
(Windows that end now never leave a snapshot, so each of them reads every transfer since the
day's first.)
``--reconcile-day`` reconciles the whole day so far each time instead: work that grows with
the run by design, and on a small machine takes the CPU the paid calls' p99 needs. On a
PostgreSQL server with autovacuum off, ``VACUUM (ANALYZE)`` runs every ``VACUUM_EVERY`` s in its
place (:func:`autovacuum_stand_in`).

Each minute it prints the calls made, p50/p99 call latency, the largest worker RSS and the
ledger connections the workers hold (PostgreSQL: the bench database's rows in
``pg_stat_activity`` under the workers' ``application_name``; SQLite: the workers' file
descriptors on the ledger file). The CLI's connections come and go with each command (more of
them are caught open the longer a reconcile runs): they are printed beside, as ``cli``, and
judged by nothing but the commands' own exit. Beside each minute's p99 it prints the p99 of
the calls no CLI command overlapped: on a small machine a command's process takes CPU the
calls need, and that is the machine's size, not the service growing. At the end it compares
the last minute with the first settled one (the second, when there are at least three) for
memory, connections and that quiet p99, and with the first minute whose reconciles started
from a snapshot for the p99 of all calls and the reconciles' time; it exits 1 if one grew, or
if a call or a reconcile failed.

Usage: python bench/soak.py [--minutes 10] [--db sqlite|postgres|both] [--workers 4]
                            [--rate 40] [--pg-url URL] [--reconcile-day]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import queue
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from scaleout import PG_ADMIN, driver_url, throwaway_database
from sqlalchemy.engine import make_url

from mcpbill_cli import Verifier
from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import BillingError
from mcpbill_cli.keys import KeyRing, KeySource
from mcpbill_cli.ledger import credit
from mcpbill_cli.ledger.engine import make_engine, writing
from mcpbill_cli.reconcile.snapshots import SETTLED

PRICING = """version = 1
[tools.search]
price = "0.000001"
"""
TOOL = "search"
TOKEN_LIMIT = 10**10  # micro-USDC per worker token: far more than a soak spends
SAMPLE_EVERY = 5.0  # seconds between a worker's reports and the connection counts
SWEEP_EVERY = 15.0
RECONCILE_EVERY = 30.0
VACUUM_EVERY = 60.0
MCPBILL = str(Path(sys.executable).with_name("mcpbill"))


@dataclass(frozen=True)
class Sample:
    """What one worker did since its last report."""

    worker: int
    pid: int
    at: float  # time.time()
    rss_mb: float
    calls: list[tuple[float, float]]  # (time.time() it began, milliseconds it took)
    failed: int


@dataclass
class Minute:
    """One minute of the run, as printed."""

    calls: list[tuple[float, float]] = field(default_factory=list)  # (began, ms)
    quiet_ms: list[float] = field(default_factory=list)  # of calls no CLI command overlapped
    failed: int = 0
    rss_mb: dict[int, float] = field(default_factory=dict)  # worker -> largest RSS seen
    connections: int = 0  # the most the workers held at once
    cli_connections: int = 0  # the most the CLI's commands held at once
    sweeps: int = 0
    reconciles: list[float] = field(default_factory=list)  # seconds each took
    reconcile_failures: list[str] = field(default_factory=list)  # exit codes, error findings

    @property
    def p50(self) -> float:
        return _percentile([ms for _, ms in self.calls], 0.50)

    @property
    def p99(self) -> float:
        return _percentile([ms for _, ms in self.calls], 0.99)

    @property
    def quiet_p99(self) -> float:
        return _percentile(self.quiet_ms, 0.99)

    @property
    def rss(self) -> float:
        return max(self.rss_mb.values(), default=0.0)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


# --- the workers (each in a process of its own) -------------------------------------------------


def rss_mb() -> float:
    """This process's resident memory, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def paid_worker(home: Path, db_url: str, token: str, worker: int, rate: float, seconds: float,
                samples: Any) -> None:
    """Charge ``token`` at ``rate`` per second for ``seconds``, reporting every SAMPLE_EVERY."""
    verifier = Verifier(keys=KeySource(directory=home / "keys"), pricing=home / "pricing.toml",
                        db_url=worker_url(db_url))
    tag = f"{worker}-{secrets.token_hex(4)}"
    start = last_report = time.perf_counter()
    sent = failed = 0
    latencies: list[tuple[float, float]] = []
    while (now := time.perf_counter()) < start + seconds:
        due = start + sent / rate
        if now < due:
            time.sleep(due - now)
        began, wall = time.perf_counter(), time.time()
        try:
            verifier.charge(token, TOOL, args={"n": f"{tag}-{sent}"},
                            idempotency_key=f"soak-{tag}-{sent}")
            latencies.append((wall, (time.perf_counter() - began) * 1000))
        except BillingError:
            failed += 1
        sent += 1
        if time.perf_counter() - last_report >= SAMPLE_EVERY:
            samples.put(Sample(worker, os.getpid(), time.time(), rss_mb(), latencies, failed))
            latencies, failed, last_report = [], 0, time.perf_counter()
    samples.put(Sample(worker, os.getpid(), time.time(), rss_mb(), latencies, failed))
    verifier.close()


WORKER_APP = "mcpbill-soak-worker"


def worker_url(db_url: str) -> str:
    """``db_url`` with the workers' ``application_name`` (PostgreSQL), to count their
    connections apart from the CLI's."""
    url = make_url(db_url)
    if url.get_backend_name() != "postgresql":
        return db_url
    return url.update_query_dict({"application_name": WORKER_APP}).render_as_string(
        hide_password=False)


# --- the operator's chores, through the real CLI ------------------------------------------------


class Chores(threading.Thread):
    """Issue short-lived tokens and sweep them; reconcile the day; counted into ``minutes``."""

    def __init__(self, env: dict[str, str], until: float, record: Any, *,
                 whole_day: bool, vacuum: Callable[[], None] | None) -> None:
        super().__init__(daemon=True)
        self.env, self.until, self.record, self.whole_day = env, until, record, whole_day
        self.vacuum = vacuum
        self.spans: list[list[float]] = []  # [began, ended] of each command (ended: inf, running)

    def run(self) -> None:
        next_sweep = next_reconcile = next_vacuum = time.time()
        since = utcnow() - timedelta(minutes=1)  # before the tenant was funded
        while time.time() < self.until:
            if self.vacuum is not None and time.time() >= next_vacuum:
                next_vacuum += VACUUM_EVERY
                with self.span():
                    self.vacuum()
            if time.time() >= next_sweep:
                self.cli("token", "issue", "-t", "soak", "--limit", "0.01", "--ttl", "5s")
                self.record("sweep", self.cli("token", "sweep", "--json")[0] == 0)
                next_sweep += SWEEP_EVERY
            if time.time() >= next_reconcile:
                next_reconcile += RECONCILE_EVERY
                if self.whole_day:
                    self.reconcile(utcnow().replace(hour=0, minute=0, second=0, microsecond=0),
                                   utcnow())
                elif (settled := utcnow() - SETTLED - timedelta(seconds=10)) > since:
                    self.reconcile(since, settled)
                    since = settled
            time.sleep(0.5)

    def reconcile(self, since: datetime, until: datetime) -> None:
        began = time.perf_counter()
        code, out = self.cli("reconcile", "--from", since.isoformat(), "--to", until.isoformat(),
                             "--json")
        self.record("reconcile", (code, time.perf_counter() - began, _findings(out)))

    @contextmanager
    def span(self) -> Iterator[None]:
        """Note when a chore ran, to tell the calls it overlapped from the rest."""
        span = [time.time(), math.inf]
        self.spans.append(span)
        try:
            yield
        finally:
            span[1] = time.time()

    def cli(self, *args: str) -> tuple[int, str]:
        with self.span():
            return self._run(*args)

    def _run(self, *args: str) -> tuple[int, str]:
        done = subprocess.run([MCPBILL, *args], env=self.env, capture_output=True, text=True,
                              timeout=300, check=False)
        return done.returncode, done.stdout


def _findings(stdout: str) -> list[str]:
    """The names of a reconcile's error findings (its --json document)."""
    try:
        found = json.loads(stdout)["data"]["findings"]
    except (ValueError, KeyError, TypeError):
        return ["(no report)"]
    return [f["name"] for f in found if f["severity"] == "error"]


# --- the ledger ---------------------------------------------------------------------------------


def prepare(home: Path, db_url: str, workers: int) -> tuple[dict[str, str], list[str]]:
    """``mcpbill init`` a home on ``db_url``, price the tool, fund tenant ``soak`` and issue one
    token per worker; the environment the CLI needs, and the tokens."""
    env = {**os.environ, "MCPBILL_HOME": str(home), "MCPBILL_DB_URL": db_url, "NO_COLOR": "1"}
    subprocess.run([MCPBILL, "init"], env=env, check=True, capture_output=True)
    (home / "pricing.toml").write_text(PRICING)
    engine = make_engine(db_url)
    signer = KeyRing.load(home / "keys").signing_key()
    with writing(engine) as conn:
        credit.fund_demo(conn, "soak", TOKEN_LIMIT * (workers + 1), now=utcnow())
        tokens = [credit.issue(conn, credit.IssueRequest(
            tenant="soak", agent=f"worker{n}", limit=TOKEN_LIMIT, ttl=86_000, scope=None,
            audience="mcpbill", issuer="mcpbill"), signer=signer, ttl_cap=86_400,
            now=utcnow()).token for n in range(workers)]
    engine.dispose()
    return env, tokens


@contextmanager
def ledger_url(kind: str, root: Path, pg_url: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{root / 'ledger.db'}"
        return
    with throwaway_database(pg_url) as url:
        yield url


def autovacuum_stand_in(db_url: str, pg_url: str) -> Callable[[], None] | None:
    """Where the server runs without autovacuum (a setting of the whole server, which a bench
    does not change): what autovacuum would do, ``VACUUM (ANALYZE)`` of the bench's database.

    The README asks for autovacuum on. Without it, the rows every paid call updates (its
    token's account) and every seal stamps (its events) are never reclaimed, and the planner
    keeps the statistics of an empty ledger: reconcile's incremental reads (the transfers and
    calls since the last snapshot) become scans of whole tables, longer each minute. That is
    the server's configuration, not the soak's subject; a soak on such a server stands in for
    autovacuum, and says so. ``None`` where autovacuum is on.
    """
    with psycopg.connect(driver_url(pg_url), autocommit=True) as admin:
        row = admin.execute("SHOW autovacuum").fetchone()
    if row is not None and row[0] == "on":
        return None

    def vacuum() -> None:
        with psycopg.connect(driver_url(db_url), autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE)")

    return vacuum


class ConnectionCount:
    """Open ledger connections: PostgreSQL's own count, or the workers' descriptors on the
    SQLite file."""

    def __init__(self, kind: str, db_url: str, pg_url: str) -> None:
        self.kind, self.db_url = kind, db_url
        self.admin = (psycopg.connect(driver_url(pg_url), autocommit=True)
                      if kind == "postgres" else None)

    def now(self, pids: list[int]) -> tuple[int, int]:
        """(the workers' connections, the CLI's)."""
        if self.admin is not None:
            name = self.db_url.rsplit("/", 1)[-1]
            row = self.admin.execute(
                "SELECT count(*) FILTER (WHERE application_name = %s), "
                "count(*) FILTER (WHERE application_name <> %s) "
                "FROM pg_stat_activity WHERE datname = %s", (WORKER_APP, WORKER_APP, name)
            ).fetchone()
            return (int(row[0]), int(row[1])) if row else (0, 0)
        path = os.path.realpath(self.db_url.removeprefix("sqlite:///"))
        return sum(_fds_on(pid, path) for pid in pids), 0

    def close(self) -> None:
        if self.admin is not None:
            self.admin.close()


def _fds_on(pid: int, path: str) -> int:
    count = 0
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                count += os.readlink(fd.path) == path
            except OSError:
                continue
    except OSError:
        return 0
    return count


# --- one soak -----------------------------------------------------------------------------------


def soak(kind: str, minutes: float, workers: int, rate: float, pg_url: str, *,
         whole_day: bool) -> bool:
    """Run one soak on ``kind``; True when nothing grew and nothing failed."""
    with tempfile.TemporaryDirectory(prefix="mcpbill-soak-") as tmp, \
            ledger_url(kind, Path(tmp), pg_url) as db_url:
        home = Path(tmp) / "home"
        env, tokens = prepare(home, db_url, workers)
        vacuum = autovacuum_stand_in(db_url, pg_url) if kind == "postgres" else None
        print(f"\n{kind}: {workers} workers x {rate:g} calls/s for {minutes:g} min, sealing, "
              f"a sweep every {SWEEP_EVERY:g} s, a reconcile every {RECONCILE_EVERY:g} s"
              + (f"; autovacuum is off on this server: VACUUM (ANALYZE) every "
                 f"{VACUUM_EVERY:g} s in its place" if vacuum else ""))
        board = run(kind, home, db_url, pg_url, env, tokens, minutes, rate, whole_day, vacuum)
        return verdict(board, whole_day=whole_day)


class Board:
    """The run's minutes, filled in as samples and chores come in."""

    def __init__(self, seconds: float) -> None:
        self.start = time.time()
        self.spans: list[list[float]] = []  # the chores' (Chores.spans)
        self.minutes = [Minute() for _ in range(max(int(-(-seconds // 60)), 1))]
        self.printed = 0

    def minute(self, at: float) -> Minute:
        return self.minutes[min(int((at - self.start) // 60), len(self.minutes) - 1)]

    def add(self, sample: Sample) -> None:
        now = self.minute(sample.at)
        now.calls += sample.calls
        now.failed += sample.failed
        now.rss_mb[sample.worker] = max(now.rss_mb.get(sample.worker, 0), sample.rss_mb)

    def record(self, chore: str, value: Any) -> None:
        now = self.minute(time.time())
        if chore == "sweep":
            now.sweeps += 1
            return
        code, took, errors = value
        now.reconciles.append(took)
        if code != 0:
            now.reconcile_failures.append(f"exit {code}: {', '.join(errors) or '-'}")

    def show_finished(self, *, all_of_them: bool = False) -> None:
        """Print each minute once it is over (and its last samples are in)."""
        last = len(self.minutes) if all_of_them else len(self.minutes) - 1
        while self.printed < last and (
                all_of_them or time.time() - self.start >= (self.printed + 1) * 60 + 6):
            minute = self.minutes[self.printed]
            minute.quiet_ms = [ms for began, ms in minute.calls
                               if not self.overlapped(began, began + ms / 1000)]
            show(self.printed + 1, minute)
            self.printed += 1

    def overlapped(self, began: float, ended: float) -> bool:
        """Whether a CLI command ran during any of ``began``..``ended``."""
        return any(start <= ended and began <= end for start, end in self.spans)


def run(kind: str, home: Path, db_url: str, pg_url: str, env: dict[str, str],
        tokens: list[str], minutes: float, rate: float, whole_day: bool,
        vacuum: Callable[[], None] | None) -> list[Minute]:
    seconds = minutes * 60
    context = multiprocessing.get_context("spawn")
    samples = context.Queue()
    processes = [context.Process(target=paid_worker, args=(home, db_url, token, n, rate,
                                                           seconds, samples))
                 for n, token in enumerate(tokens)]
    board = Board(seconds)
    for process in processes:
        process.start()
    chores = Chores(env, board.start + seconds, board.record, whole_day=whole_day,
                    vacuum=vacuum)
    board.spans = chores.spans
    chores.start()
    counter = ConnectionCount(kind, db_url, pg_url)
    try:
        while any(p.is_alive() for p in processes) or not samples.empty():
            with suppress(queue.Empty):
                board.add(samples.get(timeout=SAMPLE_EVERY))
            current = board.minute(time.time())
            workers, cli = counter.now([p.pid for p in processes if p.pid])
            current.connections = max(current.connections, workers)
            current.cli_connections = max(current.cli_connections, cli)
            board.show_finished()
    finally:
        counter.close()
        for process in processes:
            process.join(timeout=30)
        chores.join(timeout=60)
    board.show_finished(all_of_them=True)
    if any(p.exitcode != 0 for p in processes):
        raise RuntimeError(f"a worker died: exit codes {[p.exitcode for p in processes]}")
    return board.minutes


def show(number: int, minute: Minute) -> None:
    reconciles = (f"{len(minute.reconciles)} reconcile(s) "
                  f"{max(minute.reconciles, default=0):.1f} s"
                  + (f" (FAILED {'; '.join(minute.reconcile_failures)})"
                     if minute.reconcile_failures else ""))
    print(f"minute {number:>2}: {len(minute.calls):>6} calls"
          f"{f' ({minute.failed} FAILED)' if minute.failed else ''}  "
          f"p50 {minute.p50:6.2f} ms  p99 {minute.p99:7.2f} ms "
          f"({minute.quiet_p99:6.2f} with no CLI command running)  "
          f"worker RSS max {minute.rss:6.1f} MB  db connections {minute.connections:>3} "
          f"(cli {minute.cli_connections})  "
          f"{minute.sweeps} sweep(s)  {reconciles}", flush=True)


def verdict(board: list[Minute], *, whole_day: bool) -> bool:
    """Compare the last minute with the first settled one; print and return whether all held."""
    first = board[1] if len(board) >= 3 else board[0]
    last = board[-1]
    # Reconciles start once a window has settled (minutes in): p99 beside the CLI's commands
    # is judged from the first minute they run as they will to the end, p99 of the calls no
    # command overlapped from the first settled minute.
    reconciled = [m for m in board if m.reconciles][1:]  # the first reads from the start
    steady = reconciled[0] if not whole_day and len(reconciled) >= 2 else first
    grew = {
        "worker RSS": last.rss > first.rss * 1.2 and last.rss - first.rss > 20,
        "db connections": last.connections > first.connections + 2,
        "p99 latency, no CLI command running": _grew(first.quiet_p99, last.quiet_p99),
        "p99 latency, all calls": _grew(steady.p99, last.p99),
    }
    if steady is not first:  # each reconcile does the same work: no growth either
        took = max(steady.reconciles), max(last.reconciles, default=0.0)
        grew["reconcile time"] = took[1] > took[0] * 2 and took[1] - took[0] > 1
    failures = sum(m.failed for m in board)
    bad_reconciles = sum(len(m.reconcile_failures) for m in board)
    print(f"first settled minute vs last: worker RSS {first.rss:.1f} -> {last.rss:.1f} MB, "
          f"db connections {first.connections} -> {last.connections}, "
          f"p99 with no CLI command running {first.quiet_p99:.2f} -> {last.quiet_p99:.2f} ms; "
          f"from the first minute reconciles started from a snapshot: p99 {steady.p99:.2f} -> "
          f"{last.p99:.2f} ms, longest reconcile {max(steady.reconciles, default=0):.1f} -> "
          f"{max(last.reconciles, default=0):.1f} s")
    for what, did in grew.items():
        print(f"  {what}: {'GREW' if did else 'bounded'}")
    print(f"  failed calls: {failures}, failed or unclean reconciles: {bad_reconciles}")
    return not any(grew.values()) and failures == 0 and bad_reconciles == 0


def _grew(first: float, last: float) -> bool:
    return last > first * 2 and last - first > 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=40.0, help="calls per second per worker")
    parser.add_argument("--pg-url", default=PG_ADMIN)
    parser.add_argument("--reconcile-day", action="store_true",
                        help="reconcile the whole day so far each time, not what came since "
                             "the last reconcile")
    options = parser.parse_args()
    kinds = ["sqlite", "postgres"] if options.db == "both" else [options.db]
    held = [soak(kind, options.minutes, options.workers, options.rate, options.pg_url,
                 whole_day=options.reconcile_day)
            for kind in kinds]
    print("\nsoak:", "nothing grew without bound" if all(held) else "SOMETHING GREW OR FAILED")
    sys.exit(0 if all(held) else 1)


if __name__ == "__main__":
    main()
