"""The one redaction function: what it hides, and what it leaves readable."""

from __future__ import annotations

import pytest

from mcpbill_cli.errors import NotFound
from mcpbill_cli.redaction import redact

JWT = ("eyJhbGciOiJFZERTQSIsImtpZCI6IjIwMjYxMjA1LWFiIiwidHlwIjoiSldUIn0"
       ".eyJqdGkiOiJ0b2tfMSJ9.c2lnbmF0dXJlLWJ5dGVz")


@pytest.mark.parametrize(("text", "shown", "secret"), [
    ("postgresql://ops:s3cret@db/ledger", "postgresql://ops:***@db/ledger", "s3cret"),
    ("postgresql://ops:p@ss:w0rd@db:5432/x", "postgresql://ops:***@db:5432/x", "w0rd"),
    ("postgresql://ops:p%40ss@db/x", "postgresql://ops:***@db/x", "p%40ss"),
    ("postgresql://ops@db/x?password=hunter2&sslmode=require",
     "postgresql://ops@db/x?password=***&sslmode=require", "hunter2"),
    ("https://rpc.example/v1?api_key=K3Y&chain=1", "https://rpc.example/v1?api_key=***&chain=1",
     "K3Y"),
    ("host=db user=ops password='a b c' dbname=x", "host=db user=ops password=*** dbname=x",
     "a b c"),
    ("Authorization: Bearer abc.def-123", "Authorization: Bearer …(redacted)", "abc.def"),
    ("AUTHORIZATION: BEARER abc.def-123", "AUTHORIZATION: BEARER …(redacted)", "abc.def"),
    ("réponse refusée : bearer abc.def-123", "réponse refusée : bearer …(redacted)",
     "abc.def"),
    ("https://ops:s3cret@rpc.example/v1 then password=hunter2",
     "https://ops:***@rpc.example/v1 then password=***", "hunter2"),
    (f"no token {JWT}; try again", "no token eyJhbGciOi…(redacted); try again", "c2ln"),
])
def test_secrets_are_masked(text: str, shown: str, secret: str) -> None:
    assert redact(text) == shown
    assert secret not in redact(text)


@pytest.mark.parametrize("text", [
    "sqlite:////home/ops/.config/mcpbill/ledger.db", "postgresql://ops@db:5432/ledger",
    "tok_0123456789abcdef", "search=0.003 USDC", "idempotency_key=call-7",
])
def test_what_holds_no_secret_stays_as_it_is(text: str) -> None:
    assert redact(text) == text


def test_an_error_message_is_redacted_when_the_error_is_made() -> None:
    error = NotFound(f"no token {JWT}")
    assert JWT not in error.message and JWT not in str(error)
    assert error.to_dict()["message"] == "no token eyJhbGciOi…(redacted)"
