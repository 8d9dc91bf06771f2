"""The calling agent's credit token as the payer of a downstream x402 payment.

A payment is a billed call like any other: a hold on ``token:<jti>`` for the challenge's amount
(not a table price; rule ``"x402"``), captured with a signed receipt that records the on-chain
settlement, or voided. The hold is the ledger's guarded debit, so an agent can never spend past
its token's limit or its tenant's daily cap, and its idempotency key is the payment request's id,
so a request is paid at most once: a key seen before is never signed for again.

Until :class:`~mcpbill_cli.verifier.Verifier` takes an ``amount`` (see the x402 issue), this
module holds and captures through the ledger's own call operations (``ledger.calls``) with the
verifier's keys, settings and pricing table, exactly as the verifier does for a tool call.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine

from mcpbill_cli.errors import (
    InvalidCreditToken,
    ScopeDenied,
    StatelessVerifier,
)
from mcpbill_cli.ledger import calls
from mcpbill_cli.ledger.engine import reading
from mcpbill_cli.receipts import Receipt
from mcpbill_cli.scope import in_scope
from mcpbill_cli.tokens import Claims, decode_token
from mcpbill_cli.verifier import Hold, Verifier
from mcpbill_cli.x402.errors import X402AlreadyPaid

RULE = "x402"


class AgentBudget:
    """Hold, capture and void downstream payments on one agent's credit token.

    ``tool`` is the tool the payment serves (the agent's call); the token's scope must cover it.
    """

    def __init__(self, verifier: Verifier, token: str, *, tool: str) -> None:
        self.verifier = verifier
        self.token = token
        self.tool = tool
        self._claims: Claims | None = None

    @property
    def claims(self) -> Claims:
        """The token's verified claims (signature, time, audience, issuer, scope)."""
        if self._claims is None:
            v = self.verifier
            claims = decode_token(self.token, v.keys.verification_keys(), audience=v.audience,
                                  issuer=v.issuer, leeway=v.leeway, now=v.now())
            if not in_scope(claims.scope, self.tool):
                raise ScopeDenied(f"tool {self.tool!r} is outside this token's scope "
                                  f"{list(claims.scope)}", tool=self.tool,
                                  scope=list(claims.scope))
            self._claims = claims
        return self._claims

    def remaining(self) -> int:
        """Micro-USDC the token has left (limit less spent and held), read without moving any."""
        with reading(self._ledger()) as conn:
            found = calls.available(conn, self.claims.jti, now=self.verifier.now())
        if found is None:
            raise InvalidCreditToken(f"token {self.claims.jti} is not in this ledger",
                                     reason="unknown_token")
        return found[0]

    def request_key(self, request: Mapping[str, Any], request_id: str | int | None) -> str:
        """The idempotency key of a payment request: the same request and id, the same key."""
        if request_id is None:
            return f"x402_rnd_{uuid.uuid4().hex}"
        digest = hashlib.sha256(f"{self._request_hash(request)}:{request_id}".encode())
        return "x402_" + digest.hexdigest()[:40]

    def hold(self, amount: int, *, key: str, request: Mapping[str, Any]) -> Hold:
        """Reserve ``amount`` micro-USDC under ``key``; refuses a key that was used before
        (X402_ALREADY_PAID) or whose payment is still in progress (CALL_IN_PROGRESS)."""
        hold = self.verifier.hold(self.token, self.tool, args={RULE: dict(request)},
                                  idempotency_key=key, amount=amount, rule=RULE)
        if hold.replayed is not None:
            raise X402AlreadyPaid(
                f"this request was paid already (receipt {hold.id}, transaction "
                f"{hold.replayed.claims.get('transaction')}); it is never paid twice: use a "
                "new key to buy it again", receiptId=hold.id, idempotencyKey=key,
                transaction=hold.replayed.claims.get("transaction"),
                receipt=hold.replayed.to_dict())
        return hold  # a payment of this request still in progress was CALL_IN_PROGRESS

    def capture(self, hold: Hold, settlement: Mapping[str, Any]) -> Receipt:
        """Post the hold in full and sign a receipt recording the on-chain ``settlement``."""
        return self.verifier.capture(hold, settlement=settlement)

    def void(self, hold: Hold) -> None:
        """Release the hold: the payment did not settle, nothing is charged."""
        self.verifier.void(hold)

    # --- internals ------------------------------------------------------------------------------

    def _ledger(self) -> Engine:
        if self.verifier.engine is None:
            raise StatelessVerifier("paying x402 challenges needs a ledger-backed verifier "
                                    "(Verifier.from_settings() or a db_url)")
        return self.verifier.engine

    def _request_hash(self, request: Mapping[str, Any]) -> str:
        canonical = json.dumps([self.claims.jti, self.tool, RULE, request], sort_keys=True,
                               separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()
