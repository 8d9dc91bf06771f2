"""`mcpbill status`: is this home ready to bill? Each part is looked at on its own, so one
broken part (a ledger that cannot be reached) still leaves the others reported.

Nothing here creates, migrates or writes anything, and web3 is loaded only when an RPC is
configured: the check that needs it is the only one that talks to a chain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from mcpbill_cli.config import Settings, redact_url
from mcpbill_cli.errors import BillingError, NotInitialized

T = TypeVar("T")
RPC_TIMEOUT = 3.0  # seconds: a status check should answer quickly, even with a dead endpoint


@dataclass(frozen=True)
class LedgerStatus:
    url: str
    reachable: bool = False
    schema: str | None = None
    required: str | None = None
    up_to_date: bool = False
    pending_holds: int | None = None
    clock: str | None = None  # whose clock decides: "database" (PostgreSQL) or "host"
    clock_offset_seconds: float | None = None  # this host's clock less the database's
    clock_error_bound_seconds: float | None = None  # how far off that offset may be


@dataclass(frozen=True)
class KeysStatus:
    active_kid: str | None = None
    alg: str | None = None
    count: int = 0


@dataclass(frozen=True)
class ChainStatus:
    configured: bool
    chain: str | None = None
    rpc_url: str | None = None
    reachable: bool | None = None
    chain_id: int | None = None


@dataclass(frozen=True)
class X402Status:
    """Whether the pricing table asks for x402 payments and this home can take them; when
    it cannot, ``reasons`` say why (see :mod:`mcpbill_cli.x402.readiness`)."""

    requested: bool = False
    accepting: bool = False
    chain: str | None = None
    network: str | None = None
    pay_to: str | None = None
    settlement: str | None = None
    facilitator_url: str | None = None
    tools: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Status:
    home: str
    initialized: bool
    mode: str
    ledger: LedgerStatus
    keys: KeysStatus
    pricing_version: int | None
    chain: ChainStatus
    x402: X402Status = X402Status()


def status(settings: Settings, *,
           rpc_url: str | None = None) -> tuple[Status, list[BillingError]]:
    """Every part of the home and its ledger, and what is wrong with them, most basic first."""
    problems: list[BillingError] = []
    initialized = settings.home.is_dir()
    if not initialized:
        problems.append(NotInitialized(f"no mcpbill home at {settings.home}: check --home or "
                                       "MCPBILL_HOME, or run `mcpbill init`",
                                       path=str(settings.home)))
    from mcpbill_cli.ledger.models import SCHEMA_REVISION

    unreached = LedgerStatus(redact_url(settings.db_url), required=SCHEMA_REVISION)
    ledger = _collect(problems, lambda: _ledger(settings), unreached)
    keys, pricing_version, x402 = KeysStatus(), None, X402Status()
    if initialized:
        keys = _collect(problems, lambda: (_keys(settings), None), keys)
        pricing_version = _collect(problems, lambda: (_pricing_version(settings), None), None)
        x402 = _collect(problems, lambda: (_x402(settings), None), x402)
    chain = _collect(problems, lambda: _chain(settings, rpc_url), ChainStatus(configured=False))
    return Status(str(settings.home), initialized, settings.mode, ledger, keys, pricing_version,
                  chain, x402), problems


def _collect(problems: list[BillingError],
             check: Callable[[], tuple[T, BillingError | None]], fallback: T) -> T:
    """What ``check`` found, keeping its problem; a refusal is kept and ``fallback`` shown."""
    try:
        value, problem = check()
    except BillingError as exc:
        problems.append(exc)
        return fallback
    if problem is not None:
        problems.append(problem)
    return value


def _ledger(settings: Settings) -> tuple[LedgerStatus, BillingError | None]:
    from mcpbill_cli.ledger.engine import current_revision, make_engine, sqlite_file
    from mcpbill_cli.ledger.models import SCHEMA_REVISION

    url = redact_url(settings.db_url)
    path = sqlite_file(settings.db_url)
    if path is not None and not path.exists():
        raise NotInitialized(f"no ledger at {path}: run `mcpbill init`, or set db_url to the "
                             "ledger in use", path=str(path))
    engine = make_engine(settings.db_url, pool_size=1)
    try:
        revision = current_revision(engine)
        up_to_date = revision == SCHEMA_REVISION
        holds = _pending_holds(engine) if up_to_date else None
        clock = _clock(engine)
    finally:
        engine.dispose()
    found = LedgerStatus(url, True, revision, SCHEMA_REVISION, up_to_date, holds, *clock)
    return found, None if up_to_date else _schema_problem(revision, SCHEMA_REVISION)


def _clock(engine: Any) -> tuple[str, float | None, float | None]:
    """Whose clock decides (see :mod:`mcpbill_cli.clock`) and, for the database's, how far
    this host's is from it: a host far off makes no wrong charge, but its logs mislead."""
    from mcpbill_cli.clock import utcnow
    from mcpbill_cli.ledger.clock import DatabaseClock

    if engine.dialect.name != "postgresql":
        return "host", None, None
    database = DatabaseClock(engine)
    server = database()
    offset = (utcnow() - server).total_seconds()
    return "database", round(offset, 6), database.error_bound()


def _schema_problem(revision: str | None, required: str) -> BillingError:
    from mcpbill_cli.errors import SchemaOutdated

    if revision is None:
        return NotInitialized("the ledger has no tables yet: run `mcpbill init` "
                              "(or `mcpbill db upgrade`)")
    return SchemaOutdated(f"the ledger is at schema {revision} but this mcpbill needs "
                          f"{required}: run `mcpbill db upgrade`", current=revision,
                          required=required)


def _pending_holds(engine: Any) -> int:
    from sqlalchemy import func, select

    from mcpbill_cli.ledger.engine import reading
    from mcpbill_cli.ledger.models import transfers

    with reading(engine) as conn:
        return int(conn.execute(select(func.count()).where(
            transfers.c.kind == "pending", transfers.c.status == "pending")).scalar_one())


def _keys(settings: Settings) -> KeysStatus:
    from mcpbill_cli.keys import KeyRing

    ring = KeyRing.load(settings.keys_dir)
    active, _ = ring.signing_key()  # KEYRING_CORRUPT when a file it lists is gone or damaged
    ring.verification_keys()
    return KeysStatus(active.kid, active.alg, len(ring.keys))


def _pricing_version(settings: Settings) -> int:
    from mcpbill_cli.pricing import load_pricing

    return load_pricing(settings.pricing_path).version


def _x402(settings: Settings) -> X402Status:
    """x402 acceptance as the pricing file asks for it and the home allows it (a pricing
    file that does not load is reported by the pricing check already)."""
    from mcpbill_cli.pricing import load_pricing
    from mcpbill_cli.x402.readiness import readiness

    try:
        table = load_pricing(settings.pricing_path)
    except BillingError:  # the pricing check reports it
        return X402Status()
    return X402Status(**vars(readiness(settings, table)))


def _chain(settings: Settings, override: str | None) -> tuple[ChainStatus, BillingError | None]:
    """The default chain's RPC, asked for its chain id once, without retries."""
    from mcpbill_cli.wallet.chains import resolve_chain

    chain = resolve_chain(None, settings.file)
    url = override or chain.rpc_url
    if not url:
        return ChainStatus(configured=False, chain=chain.name), None
    from mcpbill_cli.wallet.errors import WrongChain
    from mcpbill_cli.wallet.rpc import RetryPolicy, Rpc, connect, redact_rpc_url

    shown = redact_rpc_url(url)
    try:
        actual = Rpc(connect(url, timeout=RPC_TIMEOUT), retry=RetryPolicy(attempts=1)).chain_id()
    except BillingError as exc:
        return ChainStatus(True, chain.name, shown, reachable=False), exc
    found = ChainStatus(True, chain.name, shown, reachable=True, chain_id=actual)
    if actual == chain.chain_id:
        return found, None
    return found, WrongChain(f"the RPC at {shown} serves chain id {actual}, but {chain.name} "
                             f"is {chain.caip2}", expected=chain.chain_id, actual=actual)
