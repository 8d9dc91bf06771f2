"""Refusals of the x402 resolver: each a :class:`~mcpbill_cli.errors.BillingError`, stable code.

Every refusal that can be known before signing is raised before signing: a bad challenge, no
acceptable option, an option over the per-call maximum, and the agent's budget
(``BUDGET_EXCEEDED``, from the ledger's guarded hold). ``X402_SETTLEMENT_FAILED`` comes after:
the payment was signed and sent, and the server did not confirm a settlement (the hold is voided).
"""

from __future__ import annotations

from mcpbill_cli.errors import BillingError


class X402Error(BillingError):
    """Root of the x402 refusals (catch :class:`BillingError` to catch every refusal)."""

    code = "X402_ERROR"


class X402BadChallenge(X402Error):
    """A 402 that carries no usable x402 payment requirements (missing, not JSON, malformed)."""

    code = "X402_BAD_CHALLENGE"


class X402NoAcceptableOption(X402Error):
    """No option the server accepts is one the operator allows (scheme, network, asset, domain).

    ``options`` lists every option with the reason it was refused.
    """

    code = "X402_NO_ACCEPTABLE_OPTION"


class X402OverMaximum(X402Error):
    """The cheapest allowed option costs more than the per-call maximum (``maximumUsd``)."""

    code = "X402_OVER_MAXIMUM"


class X402SettlementFailed(X402Error):
    """The payment was sent but the response confirms no settlement; nothing is charged."""

    code = "X402_SETTLEMENT_FAILED"


class X402HttpError(X402Error):
    """The URL answered with an HTTP error (400 and up; in a dry run, other than the 402 it
    came to judge), curl ``--fail`` style: its body is not data. Details: ``status``, ``url``,
    ``body_excerpt`` and, when a payment settled before the error, ``receipt_id``."""

    code = "X402_HTTP_ERROR"


class X402AlreadyPaid(X402Error):
    """This request (its idempotency key) was paid already: it is never paid twice.

    Details: ``receiptId``, ``transaction`` (the settlement), ``idempotencyKey``.
    """

    code = "X402_ALREADY_PAID"


class X402Unreachable(X402Error):
    """The URL could not be fetched at all: the connection was refused, the name does not
    resolve, or the server did not answer in time."""

    code = "X402_UNREACHABLE"


# --- accepting payments (a paid tool paid with x402) ---------------------------------------------


class X402PaymentInvalid(X402Error):
    """A payment sent for a paid call does not pay this call. ``reason`` is one of: malformed,
    scheme, version, network, asset, amount, recipient, not_yet_valid, expired, signature,
    not_offered. Carries a fresh ``paymentRequired`` where paying again can help."""

    code = "X402_PAYMENT_INVALID"

    def __init__(self, message: str, *, reason: str, **details: object) -> None:
        super().__init__(message, reason=reason, **details)
        self.reason = reason


class X402NonceUsed(X402Error):
    """This authorization (payer and nonce) was used already: on chain, or by another call on
    this ledger. A payment is settled once; sign a new authorization for a new call."""

    code = "X402_NONCE_USED"


class X402InsufficientFunds(X402Error):
    """The payer holds less USDC on chain than the authorization moves (``balance``,
    ``amount``, in the token's units)."""

    code = "X402_INSUFFICIENT_FUNDS"


class X402FacilitatorUnavailable(X402Error):
    """The facilitator could not be reached or did not answer; nothing was settled or charged,
    and the tool's output was withheld."""

    code = "X402_FACILITATOR_UNAVAILABLE"
    told = ("the x402 facilitator cannot be reached just now: nothing was settled or charged; "
            "retry shortly")
