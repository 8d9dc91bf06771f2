"""What a reconcile is asked (:class:`ReconcileOptions`) and what it answers
(:class:`ReconcileReport`): frozen dataclasses, no I/O."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from mcpbill_cli.clock import rfc3339
from mcpbill_cli.errors import InvalidInput
from mcpbill_cli.ledger.seals import UNSEALED_WINDOW

Severity = Literal["error", "warning"]
ChainMode = Literal["window", "full", "off"]
DIMENSIONS = ("tenant", "agent", "tool", "token")
FIRST_YEAR, LAST_YEAR = 1970, 9000

# Every finding reconcile can report, with its severity and what it means. The README's
# "Reconcile" section is this table.
FINDINGS: dict[str, tuple[Severity, str]] = {
    "ledger_unbalanced": ("error", "all account balances do not sum to zero"),
    "account_overdrawn": ("error", "a guarded account (tenant, token) is below zero"),
    "account_sums_mismatch": ("error", "an account's stored sums differ from its transfers"),
    "token_overspent": ("error", "a token spent more than its limit"),
    "captured_call_incomplete": ("error", "a captured call lacks exactly one posted transfer "
                                          "or its receipt"),
    "charge_without_call": ("error", "a posted charge or hold whose call row is missing"),
    "call_without_transfer": ("error", "a held call whose hold transfer is missing"),
    "charge_amount_mismatch": ("error", "a call's amount differs from the transfer that moved "
                                        "its money"),
    "idempotency_key_two_outcomes": ("error", "one call (one idempotency key) has two outcomes, "
                                              "e.g. captured and voided, or charged twice"),
    "charge_after_revocation": ("error", "a call was charged after its token was revoked"),
    "charge_after_expiry": ("error", "a call was charged after its token expired (past the "
                                     "leeway)"),
    "charge_price_mismatch": ("error", "a charge differs from the price its recorded pricing "
                                       "version gives"),
    "pricing_version_unrecorded": ("warning", "a call's pricing version is not in the ledger, "
                                              "so its price cannot be checked"),
    "capture_refused": ("warning", "a call's tool ran but its hold had lapsed by its capture, "
                                   "so it was not billed and its result was withheld"),
    "hold_past_timeout": ("warning", "a hold is still pending after its timeout (run `mcpbill "
                                     "token sweep`)"),
    "x402_payment_stale": ("warning", "an x402 payment is still reserved minutes after it was "
                                      "taken: its server died between settling and recording "
                                      "(a server started on this home resolves it; or run "
                                      "Acceptor.recover())"),
    "deposit_mismatch": ("error", "a credited deposit and its ledger transfer disagree, or a "
                                  "chain deposit transfer has no deposit row"),
    "deposit_unlinked": ("warning", "USDC arrived from a sender linked to no tenant and is not "
                                    "credited yet"),
    "deposit_not_on_chain": ("error", "--onchain: the deposit's transaction does not show that "
                                      "transfer on chain"),
    "deposit_unconfirmed": ("warning", "--onchain: the deposit's transaction is no longer final "
                                       "(a reorg?), or the RPC contradicted itself about it"),
    "deposit_changed": ("error", "--onchain: the transfer at the deposit's place in its "
                                 "transaction has another amount or sender than was credited"),
    "deposit_moved": ("warning", "--onchain: the deposit's transaction was re-mined in another "
                                 "block or log position (a reorg); it is still one deposit"),
    "deposit_address_balance_differs": ("warning", "--onchain: the deposit address holds other "
                                                   "than what was recorded (withdrawn, or not "
                                                   "synced yet)"),
    "audit_chain_broken": ("error", "the sealed audit trail does not verify: an event edited, "
                                    "inserted, deleted or reordered, or a seal edited, "
                                    "deleted, unlinked or not signed by a key of the key ring"),
    "seal_money_mismatch": ("error", "a seal's money does not sum to zero, or the transfers "
                                     "its events name no longer add up to what it sealed (a "
                                     "transfer edited, deleted, re-pointed or re-dated after "
                                     "sealing)"),
    "audit_unsealed": ("warning", f"audit events written more than {UNSEALED_WINDOW} s ago are "
                                  "still unsealed (run a verifier on the ledger, or `mcpbill "
                                  "audit seal`)"),
    "event_transfer_mismatch": ("error", "a hold, capture, charge, void, expire, deposit or "
                                         "issue event without its transfer, a transfer without "
                                         "its event, one call's event twice, or an event and "
                                         "its transfer that differ in amount or account"),
    "refund_exceeds_charge": ("error", "a call is refunded past what it charged"),
    "refund_mismatch": ("error", "a refund's row, its refund transfer and its refund event "
                                 "disagree or one is missing, or a call's refunded differs "
                                 "from the sum of its refunds"),
    "receipt_invalid": ("error", "--verify-receipts: a receipt's signature does not verify"),
    "receipt_mismatch": ("error", "--verify-receipts: a receipt's signed fields differ from its "
                                  "call"),
}


@dataclass(frozen=True)
class Window:
    """A half-open span of time ``[start, end)``, both timezone-aware."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise InvalidInput("a reconcile window needs timezone-aware times")
        if self.end <= self.start:
            raise InvalidInput(f"the window ends ({rfc3339(self.end)}) before it starts "
                               f"({rfc3339(self.start)}): --to must be after --from")

    @classmethod
    def day(cls, day: date) -> Window:
        """The UTC day ``day``, midnight to midnight."""
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        return cls(start, start + timedelta(days=1))

    @classmethod
    def parse(cls, *, day: str | None = None, since: str | None = None,
              until: str | None = None, now: datetime) -> Window:
        """A window from the CLI's ``--date`` or ``--from``/``--to`` (dates or ISO 8601 times;
        a time without an offset is UTC). Nothing given: yesterday, UTC. No ``--to``: now."""
        if day is not None:
            if since is not None or until is not None:
                raise InvalidInput("give --date, or --from (and --to), not both")
            return cls.day(_parse_day(day))
        if since is None:
            if until is not None:
                raise InvalidInput("--to needs --from")
            return cls.day(now.astimezone(UTC).date() - timedelta(days=1))
        return cls(parse_moment(since, "--from"),
                   parse_moment(until, "--to") if until is not None else now)

    def __contains__(self, moment: datetime) -> bool:
        return self.start <= moment < self.end


def _parse_day(text: str) -> date:
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"--date {text!r} is not a day: use YYYY-MM-DD, like 2026-11-27",
                           field="date") from None
    _check_year(day.year, "--date", text)
    return day


def parse_moment(text: str, option: str) -> datetime:
    """A date (its midnight) or an ISO 8601 time, in UTC unless it says otherwise."""
    try:
        moment = datetime.fromisoformat(text)
        moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
        year = moment.astimezone(UTC).year
    except (ValueError, OverflowError):
        raise InvalidInput(f"{option} {text!r} is not a time: use YYYY-MM-DD or an ISO 8601 "
                           "time like 2026-11-27T06:00:00Z", field=option) from None
    _check_year(year, option, text)
    return moment


def _check_year(year: int, option: str, text: str) -> None:
    """Refuse years no ledger has: a window is widened by days and snapshots, and the years
    0001 and 9999 leave no room for that in a datetime."""
    if not FIRST_YEAR <= year <= LAST_YEAR:
        raise InvalidInput(f"{option} {text!r} is out of range: years {FIRST_YEAR} to "
                           f"{LAST_YEAR}", field=option.lstrip("-"))


@dataclass(frozen=True)
class Filters:
    """Narrow the totals and the findings about calls. Ledger-wide checks ignore filters."""

    tenant: str | None = None
    agent: str | None = None
    tool: str | None = None

    def admits(self, tenant: str | None, agent: str | None, tool: str | None = None) -> bool:
        return ((self.tenant is None or self.tenant == tenant)
                and (self.agent is None or self.agent == agent)
                and (self.tool is None or tool is None or self.tool == tool))


# (caip2) -> (the chain, a Web3 or wallet Rpc reading it); built by the CLI from config.toml.
ChainReader = Callable[[str], tuple[Any, Any]]


@dataclass(frozen=True)
class ReconcileOptions:
    """What to reconcile and how thoroughly.

    ``keys_dir`` holds keyring.json: it verifies the seals' signatures (without it they go
    unchecked, and ``skipped`` says so) and, with ``verify_receipts``, the receipts. ``now`` is
    when holds count as stale and events as left unsealed (default: the ledger's clock, read
    once). ``leeway`` (seconds) is the expiry
    grace the verifier allows. ``chain`` checks the seals holding the window's events
    (``window``), every seal (``full``), or none (``off``). ``jobs`` processes (PostgreSQL:
    connections) hash the sealed batches and verify receipts once there are enough rows.
    ``ledger_wide`` checks the whole ledger's invariants (balances, stored sums, token limits,
    captured calls posted) from the latest snapshot at or before the window's start, reading
    the transfers from there on (with no snapshot, or with ``full_history``, every transfer
    ever made). ``snapshots``: after a check that found every account's sums right, write the
    snapshot at the window's end for the next reconcile to start from (its only write; off
    for a read-only role or a replica).
    """

    window: Window
    filters: Filters = Filters()
    chain: ChainMode = "window"
    verify_receipts: bool = False
    keys_dir: Path | None = None
    onchain: ChainReader | None = None
    leeway: int = 30
    now: datetime | None = None
    jobs: int = 1
    max_rows: int = 100
    ledger_wide: bool = True
    full_history: bool = False
    snapshots: bool = True


@dataclass(frozen=True)
class Row:
    """One row a finding concerns: its table, its key there, and what is wrong with it."""

    table: str
    key: str
    detail: str = ""


@dataclass(frozen=True)
class Finding:
    """A named discrepancy. ``rows`` lists at most ``max_rows`` of the ``count`` rows found."""

    name: str
    severity: Severity
    message: str
    rows: tuple[Row, ...]
    count: int


@dataclass(frozen=True)
class Totals:
    """Calls made in the window and what became of them; amounts in micro-USDC.

    ``charged`` is what the window's calls were captured for; ``voided`` and ``expired`` count
    holds released; ``held`` those still pending; ``refusals`` count refused calls by code.
    ``deposits`` counts deposits credited in the window, ``deposited`` their amount.
    ``refunds`` counts refunds made in the window (of calls of any time), ``refunded`` their
    amount; ``net`` is what the window earned: ``charged`` less ``refunded``.
    """

    calls: int = 0
    captured: int = 0
    charged: int = 0
    voided: int = 0
    expired: int = 0
    held: int = 0
    refusals: Mapping[str, int] = field(default_factory=dict)
    deposits: int = 0
    deposited: int = 0
    refunds: int = 0
    refunded: int = 0

    @property
    def net(self) -> int:
        return self.charged - self.refunded


@dataclass(frozen=True)
class ReconcileReport:
    """Totals and findings of one reconcile. ``totals[dimension][key]``: dimension is one of
    tenant, agent (keyed ``tenant/agent``), tool, token (keyed by jti).

    ``checks`` names the checks that ran, ``skipped`` those that did not and why.
    ``audit_anchor`` is ``(number, hash)`` of the last seal checked: keep it, and a later
    rewrite of the seals up to there (even one re-signed with a stolen key) cannot go
    unnoticed. ``None`` when no seal was checked. ``snapshot_at``: the window's end, when
    the ledger's sums are kept as of it (this reconcile wrote the snapshot, or found it), for
    the next reconcile to start from; ``None`` when not (see ``ReconcileOptions.snapshots``).
    """

    window: Window
    filters: Filters
    summary: Totals
    totals: Mapping[str, Mapping[str, Totals]]
    findings: tuple[Finding, ...]
    checks: tuple[str, ...]
    skipped: tuple[str, ...]
    audit_anchor: tuple[int, str] | None
    snapshot_at: datetime | None = None

    @property
    def errors(self) -> int:
        return sum(1 for f in self.findings if f.severity == "error")

    @property
    def warnings(self) -> int:
        return sum(1 for f in self.findings if f.severity == "warning")

    def failed(self, *, strict: bool = False) -> bool:
        """True when a CI gate should fail: any error, or with ``strict`` any warning too."""
        return bool(self.errors or (strict and self.warnings))
