"""The ledger's tables, as SQLAlchemy Core. Migrations in ``migrations/`` create them.

Accounts and transfers follow TigerBeetle: an account keeps four running sums; a transfer moves
an amount from a debit account to a credit account once, under an id the caller chose.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

# The Alembic revision this code reads and writes; `mcpbill db upgrade` brings a ledger to it.
SCHEMA_REVISION = "0014"

metadata = MetaData()

accounts = Table(
    "accounts",
    metadata,
    Column("id", String(200), primary_key=True),  # tenant:acme, token:<jti>, revenue, chain:<caip2>
    Column("kind", String(16), nullable=False),
    # A guarded account may never spend more than it was credited: enforced by CHECK and by the
    # conditional UPDATE that moves money, never by reading first.
    Column("guarded", Boolean, nullable=False),
    Column("closed", Boolean, nullable=False, default=False),
    Column("debits_posted", BigInteger, nullable=False, default=0),
    Column("credits_posted", BigInteger, nullable=False, default=0),
    Column("debits_pending", BigInteger, nullable=False, default=0),
    Column("credits_pending", BigInteger, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    CheckConstraint(
        "debits_posted >= 0 AND credits_posted >= 0 AND debits_pending >= 0"
        " AND credits_pending >= 0",
        name="ck_accounts_sums_nonnegative",
    ),
    CheckConstraint(
        "NOT guarded OR credits_posted - debits_posted - debits_pending >= 0",
        name="ck_accounts_no_overdraft",
    ),
)

transfers = Table(
    "transfers",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("debit_account_id", String(200), ForeignKey("accounts.id"), nullable=False),
    Column("credit_account_id", String(200), ForeignKey("accounts.id"), nullable=False),
    Column("amount", BigInteger, nullable=False),
    # posted | pending | post_pending | void_pending
    Column("kind", String(16), nullable=False),
    Column("pending_id", String(200), ForeignKey("transfers.id"), nullable=True),
    # for kind=pending: pending | posted | voided | expired
    Column("status", String(10), nullable=True),
    Column("timeout_at", DateTime(timezone=True), nullable=True),
    # what the money is for: deposit, allot, charge, hold, capture, void, release, child
    Column("code", String(16), nullable=False),
    Column("ref", String(200), nullable=True),
    Column("demo", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("amount >= 0", name="ck_transfers_amount_nonnegative"),
    CheckConstraint("debit_account_id <> credit_account_id", name="ck_transfers_two_accounts"),
    Index("ix_transfers_debit", "debit_account_id"),
    Index("ix_transfers_credit", "credit_account_id"),
    Index("ix_transfers_pending_open", "status", "timeout_at"),
    Index("ix_transfers_created", "created_at"),
)

tokens = Table(
    "tokens",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("tenant", String(100), nullable=False),
    Column("agent", String(200), nullable=False),
    Column("kid", String(64), nullable=False),
    Column("scope", Text, nullable=False),  # JSON list of tool patterns
    Column("audience", String(200), nullable=False),
    Column("parent_jti", String(64), ForeignKey("tokens.jti"), nullable=True),
    Column("limit_micro", BigInteger, nullable=False),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("revoke_reason", Text, nullable=True),
    Column("demo", Boolean, nullable=False, default=False),
    # The token's own spend caps per UTC day and calendar month (NULL: none), and its auto
    # top-up: under ``topup_below_micro`` available after a capture, credit from its tenant
    # (a child: its parent) up to ``topup_to_micro``. Set at issue, never changed.
    Column("daily_cap_micro", BigInteger, nullable=True),
    Column("monthly_cap_micro", BigInteger, nullable=True),
    Column("topup_below_micro", BigInteger, nullable=True),
    Column("topup_to_micro", BigInteger, nullable=True),
    # Its own rate limits: the ``rateLimits`` claim as JSON (NULL: none), so that a token
    # signed again (``token extend``) keeps them.
    Column("rate_limits", Text, nullable=True),
    CheckConstraint("limit_micro > 0", name="ck_tokens_limit_positive"),
    Index("ix_tokens_tenant", "tenant"),
    Index("ix_tokens_parent", "parent_jti"),
)

# One row per billed call: the idempotency record, the outcome and the signed receipt.
calls = Table(
    "calls",
    metadata,
    Column("id", String(64), primary_key=True),  # receipt id
    Column("idempotency_key", String(200), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("jti", String(64), nullable=False),
    Column("tenant", String(100), nullable=False),
    Column("agent", String(200), nullable=False),
    Column("tool", String(200), nullable=False),
    Column("units", BigInteger, nullable=True),
    Column("amount_held", BigInteger, nullable=False),
    Column("amount", BigInteger, nullable=True),  # captured
    Column("status", String(10), nullable=False),  # held | captured | voided | expired
    Column("transfer_id", String(200), nullable=True),
    Column("timeout_at", DateTime(timezone=True), nullable=True),
    Column("pricing_version", Integer, nullable=False),
    Column("price_rule", String(200), nullable=False),
    Column("receipt", Text, nullable=True),
    # The tool's result as the agent got it (JSON, up to the verifier's cap), so a replay
    # returns it without running the tool again; NULL when not kept.
    Column("result", Text, nullable=True),
    Column("demo", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("resolved_at", DateTime(timezone=True), nullable=True),
    # A key derived from the call (not given by the caller) is retired once its dedupe window
    # has passed, so that the same call made again later is a new call under the same key.
    Column("key_retired", Boolean, nullable=False, default=False),
    # What refunds gave back of ``amount``: raised by one conditional UPDATE per refund
    # (``refunded + x <= amount``), so no interleaving of refunds passes the charge.
    Column("refunded", BigInteger, nullable=False, server_default=text("0")),
    # The budget windows the call's hold was counted in ("tenant.day agent.month ..."; NULL:
    # none), so a void or a partial capture gives back to exactly those windows.
    Column("budgets", String(100), nullable=True),
    # Keys belong to a tenant (another tenant's "K" is another key); one live call per key:
    # the partial unique index uq_calls_live_key, see with_partial_indexes().
    Index("ix_calls_jti", "jti"),
    Index("ix_calls_created", "created_at"),
)

# The audit trail: every hold, capture, void, refusal of a valid token and operator action.
# Writers append without any shared lock; a sealer chains the committed events in batches
# (``seals``) and stamps each event with its seal and its own hash (see ledger.seals).
events = Table(
    "events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("kind", String(24), nullable=False),
    Column("code", String(40), nullable=True),
    Column("jti", String(64), nullable=True),
    Column("token_hash", String(64), nullable=True),  # for tokens that could not be parsed
    Column("tenant", String(100), nullable=True),
    Column("agent", String(200), nullable=True),
    Column("tool", String(200), nullable=True),
    Column("amount", BigInteger, nullable=True),
    Column("ref", String(200), nullable=True),
    Column("detail", Text, nullable=True),
    Column("demo", Boolean, nullable=False, default=False),
    Column("seal", BigInteger, nullable=True),  # NULL until a sealer takes the event
    Column("hash", String(64), nullable=True),  # the event's own hash, written when sealed
    Index("ix_events_at", "at"),
    Index("ix_events_seal", "seal"),
)

# One row per sealed batch of events: a hash chain of batches, each signed (a JWS with the
# operator's key, ``keys export-jwks`` verifies it), so no one without the key can rewrite it.
seals = Table(
    "seals",
    metadata,
    Column("number", BigInteger, primary_key=True, autoincrement=False),
    Column("first_id", BigInteger, nullable=False),
    Column("last_id", BigInteger, nullable=False),
    Column("count", Integer, nullable=False),
    Column("batch_hash", String(64), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("sealed_at", DateTime(timezone=True), nullable=False),
    Column("kid", String(64), nullable=False),
    Column("jws", Text, nullable=False),
    # What the transfers its events name add up to, as the JWS signs it (ledger.seal_money);
    # NULL for seals written before schema 0008.
    Column("money", Text, nullable=True),
    CheckConstraint("count > 0 AND first_id <= last_id", name="ck_seals_span"),
)

# Refusals of input that names no valid token (malformed, badly signed...), counted per UTC
# minute, code, reason and source with one sample, instead of one event each: a flood of
# garbage writes a few rows a minute, never a row per request.
refusal_counts = Table(
    "refusal_counts",
    metadata,
    Column("minute", DateTime(timezone=True), primary_key=True),
    Column("code", String(40), primary_key=True),
    Column("reason", String(40), primary_key=True),
    Column("source", String(100), primary_key=True),
    Column("count", BigInteger, nullable=False),
    Column("sample", String(64), nullable=True),  # a token_hash of one of them
    CheckConstraint("count > 0", name="ck_refusal_counts_positive"),
)

# The moments the ledger's sums were snapshotted at (each a reconciled window's end), where the
# next reconcile starts instead of the first transfer (see mcpbill_cli.reconcile). ``base``: the
# snapshot it was taken from (NULL: from every transfer); ``accounts``: the rows written at it.
ledger_snapshots = Table(
    "ledger_snapshots",
    metadata,
    Column("at", DateTime(timezone=True), primary_key=True),
    Column("base", DateTime(timezone=True), nullable=True),
    Column("accounts", Integer, nullable=False),
    Column("written_at", DateTime(timezone=True), nullable=False),
)

# An account's posted sums and spending (what its charges and captures debited) as of a
# snapshot's moment ``at``, summed from the transfers created before it; written when the
# account moved since the snapshot before, they hold until its next row. At a snapshot's moment
# every account's sums are its latest row at or before it (none: zero). Pending sums are not
# kept: they are the holds still open, read through ix_transfers_pending_open, never history.
account_snapshots = Table(
    "account_snapshots",
    metadata,
    Column("at", DateTime(timezone=True), primary_key=True),
    Column("account", String(200), primary_key=True),
    Column("debits_posted", BigInteger, nullable=False),
    Column("credits_posted", BigInteger, nullable=False),
    Column("spent", BigInteger, nullable=False),
    Index("ix_account_snapshots_account", "account", "at"),
)

# Deposits seen on chain, credited once per (chain, tx hash, position of the log in the tx):
# the position survives a reorg that re-mines the transaction elsewhere; the block-wide log
# index does not. Rows from before schema 0010 have no position until a sync meets them again.
deposits = Table(
    "deposits",
    metadata,
    Column("id", String(200), primary_key=True),  # <caip2>:<tx hash>:p<position> (0010 on)
    Column("chain", String(64), nullable=False),
    Column("tx_hash", String(66), nullable=False),
    Column("log_index", Integer, nullable=False),  # block-wide, where it was last seen
    Column("tx_log_position", Integer, nullable=True),  # index in the receipt's logs
    Column("block_number", BigInteger, nullable=False),
    Column("sender", String(42), nullable=False),
    Column("recipient", String(42), nullable=False),
    Column("token_address", String(42), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("tenant", String(100), nullable=True),  # NULL while the sender is not linked
    Column("status", String(12), nullable=False),  # credited | unlinked
    Column("transfer_id", String(200), ForeignKey("transfers.id"), nullable=True),
    Column("seen_at", DateTime(timezone=True), nullable=False),
    Column("credited_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("chain", "tx_hash", "tx_log_position", name="uq_deposits_tx_log"),
    CheckConstraint("amount > 0", name="ck_deposits_amount_positive"),
    # A day's reconcile reads the deposits credited, or seen unlinked, that day (0014).
    Index("ix_deposits_credited", "credited_at"),
    Index("ix_deposits_seen", "seen_at"),
)

# Which tenant a sending address belongs to.
wallet_links = Table(
    "wallet_links",
    metadata,
    Column("address", String(42), primary_key=True),  # lowercase 0x...
    Column("tenant", String(100), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Where `wallet sync` resumes, per chain.
scan_checkpoints = Table(
    "scan_checkpoints",
    metadata,
    Column("chain", String(64), primary_key=True),
    Column("block_number", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Spend per budget window: what the calls of one scope (a tenant, an agent of a tenant, a token)
# were counted for in one UTC day or calendar month, against a cap (pricing.toml or the token's
# row). Raised by a conditional UPDATE (``amount + x <= cap``) in the transaction of the debit,
# so no interleaving of calls passes a cap; a row exists only where a cap is set.
budget_spend = Table(
    "budget_spend",
    metadata,
    Column("scope", String(8), primary_key=True),  # tenant | agent | token
    Column("tenant", String(100), primary_key=True),
    Column("subject", String(200), primary_key=True),  # "" (tenant), the agent, or the jti
    Column("period", String(8), primary_key=True),  # day | month
    Column("period_start", String(10), primary_key=True),  # YYYY-MM-DD, UTC
    Column("amount", BigInteger, nullable=False),
    CheckConstraint("amount >= 0", name="ck_budget_spend_nonnegative"),
)

# Every pricing table version a verifier charged with, so reconcile can re-price old calls.
# One version, one content: ``digest`` is the sha256 of the file's normal form (its own
# ``version`` included), so a table edited without a version bump is recorded under a new one.
pricing_versions = Table(
    "pricing_versions",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("document", Text, nullable=False),  # the table's normal form, as JSON
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("digest", String(64), nullable=False),
    UniqueConstraint("digest", name="uq_pricing_versions_digest"),
)


def with_partial_indexes() -> MetaData:
    """The metadata with the partial index the tables above leave out, for Alembic to compare.

    Migration 0004 creates ``uq_calls_live_key`` on both backends. Declaring it with the tables
    would mean naming ``postgresql_where``, and SQLAlchemy then imports its PostgreSQL dialect
    with every driver's module (about 30 ms) on each command, on SQLite too; no statement needs
    the index declared.
    """
    if "uq_calls_live_key" not in {index.name for index in calls.indexes}:
        Index("uq_calls_live_key", calls.c.tenant, calls.c.idempotency_key, unique=True,
              sqlite_where=text("NOT key_retired"), postgresql_where=text("NOT key_retired"))
    return metadata

# x402 payments accepted for tool calls: one row per EIP-3009 authorization, reserved before the
# tool runs. The primary key is the authorization itself, so one nonce is settled at most once
# across every replica on this ledger.
x402_payments = Table(
    "x402_payments",
    metadata,
    Column("id", String(200), primary_key=True),  # <caip2>:<asset>:<payer>:<nonce>
    Column("status", String(10), nullable=False),  # reserved | settled | failed | released
    Column("network", String(64), nullable=False),
    Column("asset", String(42), nullable=False),
    Column("payer", String(42), nullable=False),
    Column("nonce", String(66), nullable=False),
    Column("tenant", String(100), nullable=False),
    Column("agent", String(200), nullable=False),
    Column("tool", String(200), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("valid_before", BigInteger, nullable=False),  # epoch seconds, the authorization's
    Column("request_hash", String(64), nullable=False),
    Column("call_id", String(64), nullable=True),  # the ledger call, once recorded
    Column("tx_hash", String(66), nullable=True),
    Column("error", Text, nullable=True),
    Column("reserved_at", DateTime(timezone=True), nullable=False),
    Column("resolved_at", DateTime(timezone=True), nullable=True),
    CheckConstraint("amount > 0", name="ck_x402_payments_amount_positive"),
    CheckConstraint("status IN ('reserved', 'settled', 'failed', 'released')",
                    name="ck_x402_payments_status"),
    Index("ix_x402_payments_status", "status", "reserved_at"),
)

# Refunds of captured calls: one row per refund, with its signed refund receipt. The call's
# ``refunded`` is the guard; this is the record. An operator's idempotency key belongs to the
# call's tenant (NULLs, refunds without a key, never collide).
refunds = Table(
    "refunds",
    metadata,
    Column("id", String(64), primary_key=True),  # rfnd_...
    Column("call_id", String(64), ForeignKey("calls.id"), nullable=False),
    Column("jti", String(64), nullable=False),
    Column("tenant", String(100), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("requested", BigInteger, nullable=True),  # as asked: NULL for "what is left"
    Column("refunded_after", BigInteger, nullable=False),  # the call's refunded with this one
    Column("credited_to", String(200), nullable=False),  # token:<jti> or tenant:<name>
    Column("transfer_id", String(200), nullable=False),  # refund:<id>
    Column("reason", Text, nullable=True),
    Column("idempotency_key", String(200), nullable=True),
    Column("receipt", Text, nullable=False),
    Column("demo", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("amount > 0", name="ck_refunds_amount_positive"),
    UniqueConstraint("tenant", "idempotency_key", name="uq_refunds_key"),
    Index("ix_refunds_call", "call_id"),
    Index("ix_refunds_created", "created_at"),
)


# Rate limit counters (loop protection, mcpbill_cli.ratelimits): the calls and spend of one
# scope's key (a token's jti, an agent's tenant/sub) in one fixed window (its length and its
# first second, epoch seconds), with the limits they were counted against. Rows exist only for
# tokens and agents that have a rate; old windows are swept.
rate_counters = Table(
    "rate_counters",
    metadata,
    Column("scope", String(8), primary_key=True),  # token | agent
    Column("key", String(320), primary_key=True),
    Column("window_seconds", Integer, primary_key=True),
    Column("window_start", BigInteger, primary_key=True),
    Column("calls", BigInteger, nullable=False),
    Column("spend", BigInteger, nullable=False),
    Column("call_limit", BigInteger, nullable=False),
    Column("spend_limit", BigInteger, nullable=False),
    Index("ix_rate_counters_start", "window_start"),
)

# Webhook endpoints: where alert events go, and the Standard Webhooks secret (``whsec_...``)
# deliveries are signed with. The secret is shown once, by `webhooks add`; nothing reads it back
# out but the deliverer.
webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", String(40), primary_key=True),  # whep_...
    Column("url", Text, nullable=False),
    Column("event_types", Text, nullable=False),  # JSON list of event types, or ["*"]
    Column("secret", Text, nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# The outbox: one row per alert event, written in the transaction of what caused it (a rolled
# back charge leaves none). ``id`` is the event's stable id (the webhook-id header), the same on
# every retry, so a receiver dedupes on it.
webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", String(40), primary_key=True),  # evt_...
    Column("type", String(40), nullable=False),
    Column("payload", Text, nullable=False),  # the JSON body, as signed and sent
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_webhook_events_created", "created_at"),
)

# One row per event and endpoint: the delivery's state, so it survives a restart. A deliverer
# claims a row with a guarded UPDATE (``claimed_until`` past, ``claim`` its own), so two
# deliverers never send one event to one endpoint at the same time.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("event_id", String(40), ForeignKey("webhook_events.id"), primary_key=True),
    Column("endpoint_id", String(40), primary_key=True),
    Column("status", String(10), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("claim", String(32), nullable=True),
    Column("claimed_until", DateTime(timezone=True), nullable=True),
    Column("last_status", Integer, nullable=True),  # the receiver's HTTP status
    Column("last_error", Text, nullable=True),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    CheckConstraint("status IN ('pending', 'delivered', 'failed')",
                    name="ck_webhook_deliveries_status"),
    Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    Index("ix_webhook_deliveries_endpoint", "endpoint_id"),
)

# A tenant's low-balance alert: a ``tenant.balance_low`` event when its available balance
# falls under ``below`` (micro-USDC), once per crossing.
tenant_alerts = Table(
    "tenant_alerts",
    metadata,
    Column("tenant", String(100), primary_key=True),
    Column("below", BigInteger, nullable=False),
    CheckConstraint("below > 0", name="ck_tenant_alerts_below_positive"),
)
