"""One exception tree: every refusal is a :class:`BillingError` with a stable ``code``.

Servers catch ``BillingError``; the CLI maps ``code`` to an exit status in one place
(``mcpbill_cli/cli/output.py``). ``for_agent()`` is the wire form an agent reads: ``to_dict()``,
but for the errors of the operator's own infrastructure, whose messages are the operator's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from mcpbill_cli.redaction import redact

if TYPE_CHECKING:
    from mcpbill_cli.receipts import Receipt


class BillingError(Exception):
    """Root of every mcpbill error. ``code`` is stable; ``message`` says what to do next.

    The message is redacted when the error is made: it often quotes input (a URL, a token),
    and it goes to terminals, logs and agents alike.
    """

    code: ClassVar[str] = "BILLING_ERROR"
    # What an agent is told instead of the message, by the errors about the operator's own
    # infrastructure: their messages name it (a URL, host and database, the driver's reason),
    # which is for the server's log and the CLI, not for a caller.
    told: ClassVar[str | None] = None
    shown: ClassVar[tuple[str, ...]] = ()  # the details an agent is told beside it

    def __init__(self, message: str, **details: Any) -> None:
        message = redact(message)
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The error as a JSON-ready object: ``{"code", "message", **details}``."""
        return {"code": self.code, "message": self.message, **self.details}

    def for_agent(self) -> dict[str, Any]:
        """The error as an agent is told it: :meth:`to_dict`, but only the code and
        :attr:`told` for an error about the operator's own infrastructure."""
        if self.told is None:
            return self.to_dict()
        return {"code": self.code, "message": self.told,
                **{name: self.details[name] for name in self.shown if name in self.details}}

    @property
    def agent_message(self) -> str:
        """The message of :meth:`for_agent`."""
        return self.message if self.told is None else self.told

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code}: {self.message})"


# --- refusals on the call path (DESIGN.md "The verifier's call path") -------------------------


class InvalidCreditToken(BillingError):
    """The token is malformed, badly signed, expired, not yet valid or for another audience.

    ``reason`` is one of: malformed, bad_signature, unknown_key, algorithm_not_allowed,
    expired, not_yet_valid, wrong_audience, wrong_issuer, unknown_token (validly signed but
    not in this ledger).
    """

    code = "INVALID_CREDIT_TOKEN"

    def __init__(self, message: str, *, reason: str, **details: Any) -> None:
        super().__init__(message, reason=reason, **details)
        self.reason = reason


class TokenRevoked(BillingError):
    code = "TOKEN_REVOKED"


class ScopeDenied(BillingError):
    code = "SCOPE_DENIED"


class BudgetExceeded(BillingError):
    """Recoverable: carries ``priceUsd``, ``remainingUsd``, ``shortfallUsd`` and ``fallback``."""

    code = "BUDGET_EXCEEDED"


class IdempotencyConflict(BillingError):
    code = "IDEMPOTENCY_CONFLICT"


class CallInProgress(BillingError):
    """Retryable: this idempotency key belongs to a call still running. Carries
    ``retryAfterMs``; the retry gets that call's outcome once it is done."""

    code = "CALL_IN_PROGRESS"


class DuplicateCall(BillingError):
    """This call was made and billed already, and its result cannot be returned again (not
    kept: too large, or not a tool result). Carries the original ``receipt``; ``result`` holds
    the kept result where there is one, for callers that could not be handed it otherwise."""

    code = "DUPLICATE_CALL"

    def __init__(self, message: str, *, receipt: Receipt, result: Any = None,
                 **details: Any) -> None:
        super().__init__(message, receipt=receipt.to_dict(), receiptId=receipt.receipt_id,
                         **details)
        self.receipt = receipt
        self.result = result


class PriceUnknown(BillingError):
    code = "PRICE_UNKNOWN"


class LedgerUnavailable(BillingError):
    """Retryable: the ledger cannot be reached or did not finish the transaction (a database
    restarting, a dropped connection); nothing of the call was written. The same call again,
    under the same idempotency key, is safe."""

    code = "LEDGER_UNAVAILABLE"
    told = ("the server's ledger is unavailable: nothing of this call was written or billed; "
            "retry shortly, with the same idempotency key")
    dropped = False  # the server closed a pooled connection: a new one may well do


class LedgerFull(LedgerUnavailable):
    """The ledger's disk (or its configured size limit) is full: the transaction was rolled
    back whole. Calls resume by themselves once there is room again; a server that catches
    LEDGER_UNAVAILABLE catches this too."""

    code = "LEDGER_FULL"
    told = ("the server's ledger is full: nothing of this call was written or billed; retry "
            "later, with the same idempotency key")


class HoldNotActive(BillingError):
    """A capture or void of a hold that was already resolved or has timed out."""

    code = "HOLD_NOT_ACTIVE"


class CallFailed(BillingError):
    """The call behind this idempotency key failed and was voided; it stays failed."""

    code = "CALL_FAILED"


class RequestTooLarge(BillingError):
    """A request body larger than is read (``limitBytes``): a billed HTTP request's (the
    middleware), or one sent to ``mcpbill proxy``; nothing was forwarded or held."""

    code = "REQUEST_TOO_LARGE"


class ResponseTooLarge(BillingError):
    """A billed HTTP endpoint answered with more than the middleware buffers (``limitBytes``):
    the call was voided and its response withheld."""

    code = "RESPONSE_TOO_LARGE"


class StatelessVerifier(BillingError):
    """A verifier built without a ledger can only run preflight."""

    code = "STATELESS_VERIFIER"


class UpstreamUnavailable(BillingError):
    """The MCP server behind ``mcpbill proxy`` could not be reached, or failed during the call
    (it exited, dropped the connection); the call's hold was voided. Retryable: the proxy
    restarts a stdio upstream and reconnects to an HTTP one."""

    code = "UPSTREAM_UNAVAILABLE"
    # The message names the upstream (its URL, or its command line and arguments).
    told = ("the server behind this proxy is not reachable just now, or failed during the "
            "call; the call was not billed: retry shortly")
    shown = ("tool",)


class UpstreamTimeout(BillingError):
    """The upstream did not answer within the proxy's ``--call-timeout``; the hold was voided."""

    code = "UPSTREAM_TIMEOUT"


class RateLimited(BillingError):
    """Retryable: a rate limit of the token or of its agent is reached (loop protection). The
    call held nothing. Carries ``retryAfterMs`` (when the window ends), ``limit`` (as written:
    ``"10/s"``, ``"1.50/m"`` USDC), ``kind`` (calls or spend), ``window`` (second or minute)
    and ``scope`` (token or agent)."""

    code = "RATE_LIMITED"


class ProxyBusy(BillingError):
    """The proxy is at its limit of calls in flight. Retryable: carries ``retryAfterMs``."""

    code = "PROXY_BUSY"


class ProxySessionsFull(BillingError):
    """The proxy has as many upstream sessions open as it may (one per agent session), so a
    new agent session gets none. Retryable once a session ends: carries ``retryAfterMs``."""

    code = "PROXY_SESSIONS_FULL"


# --- operator errors ---------------------------------------------------------------------------


class InvalidInput(BillingError):
    code = "INVALID_INPUT"


class NotFound(BillingError):
    code = "NOT_FOUND"


class RefundExceedsCharge(BillingError):
    """A refund asked for more than is left to refund of the call's charge (``refundableUsd``);
    nothing was refunded."""

    code = "REFUND_EXCEEDS_CHARGE"


class CallNotCaptured(BillingError):
    """A refund of a call that charged nothing: held, voided or expired (``status``), or
    captured for 0."""

    code = "CALL_NOT_CAPTURED"


class ConfirmationRequired(BillingError):
    """A destructive command was not confirmed: declined at the prompt, or run without a
    terminal to ask on and without ``--yes``."""

    code = "CONFIRMATION_REQUIRED"


class InsufficientFunds(BillingError):
    code = "INSUFFICIENT_FUNDS"


class AlreadyExists(BillingError):
    code = "ALREADY_EXISTS"


class NotInitialized(BillingError):
    code = "NOT_INITIALIZED"


class SchemaOutdated(BillingError):
    code = "SCHEMA_OUTDATED"


class AuditChainBroken(BillingError):
    """A ledger's audit trail does not verify (an upgrade refuses to seal a forged history)."""

    code = "AUDIT_CHAIN_BROKEN"


class ConfigInvalid(BillingError):
    code = "CONFIG_INVALID"


class PricingInvalid(BillingError):
    code = "PRICING_INVALID"


class PricingVersionReused(BillingError):
    """A pricing file's version names other prices than the ledger charged with under it."""

    code = "PRICING_VERSION_REUSED"


class DemoOnly(BillingError):
    code = "DEMO_ONLY"


class KeyringCorrupt(BillingError):
    """``keyring.json`` or a key file it lists is missing, unreadable or not what it should be:
    nothing can be signed or verified until it is restored (from a backup)."""

    code = "KEYRING_CORRUPT"


class FileUnavailable(BillingError):
    """A file the command was pointed at cannot be read or written (missing, a directory, no
    permission, disk full). The message names the path."""

    code = "FILE_UNAVAILABLE"


class NoTerminal(BillingError):
    """The command would ask a question, but nobody is at a terminal to answer it."""

    code = "NO_TERMINAL"


class WebhookFailed(BillingError):
    """`mcpbill webhooks test`: the endpoint did not answer 2xx (or could not be reached); the
    event stays pending and is retried."""

    code = "WEBHOOK_FAILED"


class Interrupted(BillingError):
    """Stopped by the person at the terminal: Ctrl-C, or Ctrl-D (end of input) at a prompt."""

    code = "INTERRUPTED"


class InternalError(BillingError):
    """An exception nobody anticipated: a bug. ``MCPBILL_DEBUG=1`` shows its traceback."""

    code = "INTERNAL_ERROR"
