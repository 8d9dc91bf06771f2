"""What of a call's ``_meta`` reaches the upstream: never the agent's credentials."""

from __future__ import annotations

from mcpbill_cli.mcp.wire import IDEMPOTENCY_KEY_META, LEGACY_META, TOKEN_META
from mcpbill_cli.mcp.x402 import PAYMENT_META
from mcpbill_cli.proxy.billing import forwarded_meta


def test_the_credit_token_payment_and_idempotency_key_are_never_forwarded() -> None:
    sent = {TOKEN_META: "eyJ.secret", IDEMPOTENCY_KEY_META: "key-1",
            LEGACY_META[TOKEN_META]: "eyJ.legacy", LEGACY_META[IDEMPOTENCY_KEY_META]: "key-2",
            PAYMENT_META: {"x402Version": 2, "payload": {"signature": "0xsecret"}},
            "progress_token": 3, "progressToken": 3,
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "com.example/tenant-hint": "blue"}
    assert forwarded_meta(sent) == {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "com.example/tenant-hint": "blue"}
    assert forwarded_meta({TOKEN_META: "eyJ.secret"}) is None
    assert forwarded_meta(None) is None
