"""Replicas on one PostgreSQL ledger decide by the database's clock, whatever their own say.

Two hosts, one ten minutes ahead and one ten minutes behind (their wall clocks, and monotonic
clocks counting from different boots), serve the same tenant. Each test runs twice: with the
verifier's default clock, which follows the database (:class:`DatabaseClock`, on the host's
monotonic clock), and, as a check that the test tells the two apart, with each host's own wall
clock, which must fail it (``strict`` xfail). The database itself is real and its clock untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import libfaketime
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, select, text

from mcpbill_cli.clock import Clock
from mcpbill_cli.errors import BudgetExceeded, HoldNotActive, InvalidCreditToken, LedgerUnavailable
from mcpbill_cli.keys import KeyRing, KeySource, init_keyring
from mcpbill_cli.ledger.clock import DRIFT, DatabaseClock
from mcpbill_cli.ledger.engine import make_engine, reading
from mcpbill_cli.ledger.models import budget_spend
from mcpbill_cli.ledger.schema import upgrade
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.verifier import Verifier
from tests.verifier.billing_support import PRICE, PRICING_DOC, USDC, fund, mint
from tests.verifier.invariants import assert_ledger_invariants

from .scratch_postgres import ScratchPostgres

LEEWAY = 30
SKEW = 600.0  # seconds: host A is this far ahead of the database, host B this far behind


class Host:
    """A machine's own clocks: its wall clock ``skew`` seconds off, and a monotonic clock
    counting from its own boot (``boot``), moved on by the test with :meth:`advance`."""

    def __init__(self, skew: float, boot: float) -> None:
        self.skew = skew
        self.boot = boot
        self.moved = 0.0

    def wall(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.skew + self.moved)

    def monotonic(self) -> float:
        return time.monotonic() + self.boot + self.moved

    def advance(self, seconds: float) -> None:
        self.moved += seconds


ClockFor = Callable[[Engine, Host], Clock]


def _database(engine: Engine, host: Host) -> Clock:
    return DatabaseClock(engine, monotonic=host.monotonic)


def _local(_engine: Engine, host: Host) -> Clock:
    return host.wall


@pytest.fixture(params=[
    pytest.param(_database, id="database-clock"),
    pytest.param(_local, id="local-clock", marks=pytest.mark.xfail(
        strict=True, reason="each replica's own clock decides: the replicas disagree")),
])
def clock_for(request: pytest.FixtureRequest) -> ClockFor:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    init_keyring(directory, "EdDSA", now=datetime.now(UTC) - timedelta(days=1),
                 force=False).save()
    return directory


def server_now(engine: Engine) -> datetime:
    with reading(engine) as conn:
        moment: datetime = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
    return moment.astimezone(UTC)


def replicas(engine: Engine, keys_dir: Path, clock_for: ClockFor, *, hold_timeout: int = 60,
             caps: dict[str, object] | None = None,
             skews: tuple[float, float] = (SKEW, -SKEW)) -> tuple[Verifier, Verifier]:
    """Verifier A on the host ahead, B on the host behind, sharing ``engine``'s ledger."""
    pricing = PricingTable.from_document({**PRICING_DOC, **(caps or {})})
    hosts = (Host(skews[0], boot=1_000_000.0), Host(skews[1], boot=-5_000.0))
    a, b = (Verifier(keys=KeySource(directory=keys_dir), pricing=pricing, engine=engine,
                     clock=clock_for(engine, host), leeway=LEEWAY, hold_timeout=hold_timeout)
            for host in hosts)
    return a, b


def token(engine: Engine, keys_dir: Path, *, issued: datetime, ttl: int) -> str:
    return mint(engine, KeyRing.load(keys_dir), now=issued, limit=USDC, ttl=ttl).token


def test_a_token_is_expired_or_not_by_the_databases_clock_on_every_replica(
        pg_engine: Engine, keys_dir: Path, clock_for: ClockFor) -> None:
    """One token expired a minute ago by the database, one with minutes to go: both replicas
    refuse the first and charge the second, ten minutes ahead or behind."""
    now = server_now(pg_engine)
    fund(pg_engine, "acme", 10 * USDC, now=now - timedelta(hours=1))
    expired = token(pg_engine, keys_dir, issued=now - timedelta(seconds=200), ttl=100)
    live = token(pg_engine, keys_dir, issued=now - timedelta(seconds=10), ttl=300)
    for replica in replicas(pg_engine, keys_dir, clock_for):
        with pytest.raises(InvalidCreditToken) as refused:
            replica.charge(expired, "search", args={"by": id(replica)})
        assert refused.value.reason == "expired"
        assert replica.charge(live, "search", args={"by": id(replica)}).amount == PRICE
    with reading(pg_engine) as conn:
        assert_ledger_invariants(conn)


def test_a_hold_lapses_for_the_other_replicas_sweep_at_the_databases_time(
        pg_engine: Engine, keys_dir: Path, clock_for: ClockFor) -> None:
    """B, whose clock is ten minutes behind, sweeps A's hold once the database's time is
    past its timeout, not before; A, ten minutes ahead, can no longer capture it then."""
    now = server_now(pg_engine)
    fund(pg_engine, "acme", 10 * USDC, now=now - timedelta(hours=1))
    credit = token(pg_engine, keys_dir, issued=now - timedelta(seconds=10), ttl=3600)
    a, b = replicas(pg_engine, keys_dir, clock_for, hold_timeout=2)
    hold = a.hold(credit, "search", args={"q": "lapse"})
    assert b.sweep_expired() == 0  # the database's time: two seconds to go
    time.sleep(3)
    assert b.sweep_expired() == 1
    with pytest.raises(HoldNotActive):
        a.capture(hold)
    assert a.preflight(credit, "search").remaining == USDC


def test_a_daily_cap_counts_calls_in_the_databases_utc_day_on_every_replica(
        pg_engine: Engine, keys_dir: Path, clock_for: ClockFor) -> None:
    """B's clock is still in yesterday (UTC), A's ten minutes ahead; the database's is in
    today. The cap of three searches a day holds across both, and the spend is today's."""
    now = server_now(pg_engine)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if not timedelta(minutes=1) < now - midnight < timedelta(hours=22, minutes=30):
        pytest.skip("too close to the database's midnight for one UTC day of calls")
    fund(pg_engine, "acme", 10 * USDC, now=midnight - timedelta(hours=2))
    credit = token(pg_engine, keys_dir, issued=midnight - timedelta(hours=1), ttl=86400)
    into_yesterday = (midnight - timedelta(minutes=1) - now).total_seconds()
    a, b = replicas(pg_engine, keys_dir, clock_for, skews=(SKEW, into_yesterday),
                    caps={"tenants": {"acme": {"daily_cap": "0.03"}}})
    outcomes = []
    for n in range(2):
        for replica in (a, b):
            try:
                outcomes.append(replica.charge(credit, "search", args={"n": n, "r": id(replica)}))
            except BudgetExceeded as exc:
                outcomes.append(exc)
    assert sum(isinstance(o, BudgetExceeded) for o in outcomes) == 1
    with reading(pg_engine) as conn:
        per_day = dict(conn.execute(select(budget_spend.c.period_start, budget_spend.c.amount)
                                    .where(budget_spend.c.scope == "tenant",
                                           budget_spend.c.period == "day")).all())
        assert_ledger_invariants(conn)
    assert per_day == {midnight.strftime("%Y-%m-%d"): 3 * PRICE}


def test_a_verifier_follows_the_database_clock_by_default_on_postgresql_only(
        engine: Engine, keys_dir: Path) -> None:
    """Without a ``clock``, a verifier on PostgreSQL reads the server's clock and says how
    far off it may be (also as a metric); on SQLite it keeps the host's, the database's."""
    now = datetime.now(UTC)
    fund(engine, "acme", 10 * USDC, now=now - timedelta(hours=1))
    credit = token(engine, keys_dir, issued=now - timedelta(seconds=10), ttl=3600)
    verifier = Verifier(keys=KeySource(directory=keys_dir), metrics=True,
                        pricing=PricingTable.from_document(PRICING_DOC), engine=engine)
    assert verifier.charge(credit, "search").amount == PRICE
    bound = verifier.clock_error_bound()
    assert verifier.metrics is not None
    scraped = {sample.name: sample.value for family
               in text_string_to_metric_families(verifier.metrics.text())
               for sample in family.samples}
    if engine.dialect.name == "postgresql":
        assert bound is not None and bound >= 0
        assert scraped["mcpbill_clock_error_bound_seconds"] >= bound
    else:
        assert bound is None
        assert "mcpbill_clock_error_bound_seconds" not in scraped


def test_the_clock_never_goes_backwards_when_a_new_reading_is_behind(
        pg_engine: Engine) -> None:
    """This host's monotonic clock runs 100 s while the server's runs a moment: the next
    reading is 100 s behind the last answer, and the time stands there until the server's
    catches up, then follows it again."""
    host = Host(0, boot=0)
    clock = DatabaseClock(pg_engine, resample=5, monotonic=host.monotonic)
    first = clock()
    host.advance(100)
    assert clock.error_bound() >= 100 * DRIFT  # type: ignore[operator]
    held = [clock() for _ in range(3)]  # the first of them reads the server again
    assert held[0] >= first + timedelta(seconds=100)
    assert held[0] == held[1] == held[2]
    host.advance(150)
    assert clock() > held[2]


def on_the_database_clock(cluster: ScratchPostgres, keys_dir: Path, host: Host
                          ) -> tuple[Engine, DatabaseClock, Verifier, str]:
    """A funded ledger on ``cluster``, a verifier on its clock read from ``host``, and a
    credit token issued by that clock."""
    engine = make_engine(cluster.url)
    upgrade(engine)
    clock = DatabaseClock(engine, monotonic=host.monotonic)
    fund(engine, "acme", 10 * USDC, now=clock() - timedelta(hours=1))
    credit = token(engine, keys_dir, issued=clock() - timedelta(seconds=10), ttl=3600)
    verifier = Verifier(keys=KeySource(directory=keys_dir), engine=engine, clock=clock,
                        pricing=PricingTable.from_document(PRICING_DOC))
    return engine, clock, verifier, credit


def test_an_unreachable_database_keeps_the_last_reading_and_calls_refuse(
        cluster: ScratchPostgres, keys_dir: Path) -> None:
    """The server is down when the clock reads it again: the clock answers from its last
    reading, the call is refused LEDGER_UNAVAILABLE as without it, and once the server is
    back the next call reads it afresh and is charged. A clock that never reached its server
    refuses the call the same way."""
    host = Host(0, boot=0)
    engine, clock, verifier, credit = on_the_database_clock(cluster, keys_dir, host)
    assert verifier.charge(credit, "search", args={"n": 1}).amount == PRICE
    before = clock()
    host.advance(600)  # past the next reading's time
    cluster.kill()
    assert clock() >= before + timedelta(seconds=600)
    with pytest.raises(LedgerUnavailable):
        verifier.charge(credit, "search", args={"n": 2})
    with pytest.raises(LedgerUnavailable):
        DatabaseClock(engine)()
    cluster.start()
    host.advance(2)  # past the retry
    assert verifier.charge(credit, "search", args={"n": 3}).amount == PRICE
    assert clock.error_bound() < 600 * DRIFT  # type: ignore[operator]  # a new reading
    engine.dispose()


def test_a_verifier_left_open_reads_no_clock_once_its_calls_are_done(
        cluster: ScratchPostgres, keys_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A verifier never closed outlives its database (a process exiting after it): its hold
    keeper, with no call left to keep, does not read the clock at its wakes, so nothing is
    logged. (It read it at every wake, and logged "could not read the ledger's clock".)"""
    host = Host(0, boot=0)
    engine, clock, verifier, credit = on_the_database_clock(cluster, keys_dir, host)
    with verifier.call(credit, "search"):  # kept while it runs: the keeper's thread starts
        pass
    host.advance(600)  # past the next reading's time
    cluster.kill()
    assert verifier._keeper.extend_due() == 0  # what its thread does at each wake
    assert caplog.records == []
    verifier.close()
    engine.dispose()


def test_a_failover_to_a_primary_whose_clock_is_ahead_decides_from_the_next_call(
        cluster: ScratchPostgres, keys_dir: Path) -> None:
    """The primary is replaced by one with the same data at the same address whose clock is an
    hour ahead (the same cluster started again under libfaketime). The call that finds its
    connection broken took its time before it knew; from the next one on, the new primary's
    clock decides: a token with half an hour left by the old one has expired by the new one,
    and is refused, not charged for the 30 s a reading is otherwise trusted."""
    engine = make_engine(cluster.url)
    upgrade(engine)
    before = server_now(engine)
    fund(engine, "acme", 10 * USDC, now=before - timedelta(hours=1))
    credit = token(engine, keys_dir, issued=before - timedelta(seconds=10), ttl=1800)
    verifier = Verifier(keys=KeySource(directory=keys_dir), engine=engine,
                        pricing=PricingTable.from_document(PRICING_DOC))
    assert verifier.charge(credit, "search", args={"n": 0}).amount == PRICE

    cluster.restart(env=skewed_environment("+1h"))
    assert server_now(probe := make_engine(cluster.url)) >= before + timedelta(minutes=59)
    probe.dispose()
    outcomes: list[object] = []
    for n in range(1, 6):
        try:
            outcomes.append(verifier.charge(credit, "search", args={"n": n}).amount)
        except (LedgerUnavailable, InvalidCreditToken) as refused:
            outcomes.append(refused.code)
            if isinstance(refused, InvalidCreditToken):
                break
    assert outcomes[-1] == "INVALID_CREDIT_TOKEN", outcomes
    assert len(outcomes) <= 2, outcomes  # the call that met the broken connection, then this
    assert verifier.now() >= before + timedelta(minutes=59)
    verifier.close()
    engine.dispose()


def skewed_environment(shift: str) -> dict[str, str]:
    """What a process needs in its environment for its wall clock to be ``shift`` off."""
    _, preload = libfaketime.get_reload_information()
    return {**preload, "FAKETIME": shift}
