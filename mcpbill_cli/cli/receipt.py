"""`mcpbill receipt show | verify`: recover a receipt whose reply was lost; check one offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mcpbill_cli.cli import complete
from mcpbill_cli.cli.output import JsonOption, emit, handles_errors, print_fields, receipt_data
from mcpbill_cli.cli.state import state
from mcpbill_cli.errors import FileUnavailable, InvalidInput, NotFound

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from mcpbill_cli.keys import VerificationKey
    from mcpbill_cli.ledger.calls import StoredCall

app = typer.Typer(help="Signed receipts: recover and verify.", no_args_is_help=True)


def _render(data: dict[str, object]) -> None:
    """The fields --json prints (snake_case, ``amount_micro``), a line each; values that are
    not text as JSON writes them (``true``, ``null``, objects)."""
    print_fields({key: value if isinstance(value, str) else json.dumps(value)
                  for key, value in data.items()})


@app.command("show")
@handles_errors
def show(ctx: typer.Context,
         key: Annotated[str, typer.Argument(help="A receipt id (rcpt_…) or an idempotency key.")],
         tenant: Annotated[str | None, typer.Option(
             "--tenant", "-t", help="The tenant whose idempotency key KEY is (keys belong to "
                                    "a tenant); needed when several tenants used KEY.",
             autocompletion=complete.tenants)] = None,
         as_json: JsonOption = False) -> None:
    """Show the receipt of a captured call, by receipt id or by a tenant's idempotency key."""
    from mcpbill_cli.ledger import calls
    from mcpbill_cli.ledger.engine import reading
    from mcpbill_cli.receipts import read_receipt

    with reading(state(ctx).engine()) as conn:
        stored = calls.stored(conn, call_id=key) or _by_key(conn, key, tenant)
    if stored is None or stored.receipt is None:
        state_note = f" (the call is {stored.status})" if stored else ""
        raise NotFound(f"no receipt for {key!r}{state_note}")
    receipt = read_receipt(stored.receipt)
    data = receipt_data(receipt.to_dict())
    emit(data, as_json=as_json, human=lambda: _render(data))


def _by_key(conn: Connection, key: str, tenant: str | None) -> StoredCall | None:
    from mcpbill_cli.ledger import calls

    found = [c for c in calls.with_key(conn, key) if tenant is None or c.tenant == tenant]
    if len(found) > 1:
        raise InvalidInput(f"idempotency key {key!r} is used by {len(found)} tenants: pass "
                           "--tenant T")
    return found[0] if found else None


@app.command("verify")
@handles_errors
def verify(
    ctx: typer.Context,
    receipt: Annotated[str, typer.Argument(help="The receipt JWS, or - to read it from stdin.")],
    jwks: Annotated[Path | None, typer.Option(
        "--jwks", help="Verify against this JWKS file instead of the home's keys.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Check a receipt's signature offline (a call's receipt or a refund receipt); exits 6
    (INVALID_RECEIPT) if it does not verify."""
    from mcpbill_cli.receipts import (
        REFUND_TYPE,
        receipt_type,
        verify_receipt,
        verify_refund_receipt,
    )

    text = (sys.stdin.read() if receipt == "-" else receipt).strip()
    # Every key the home ever signed with: a receipt stays genuine after its key is retired.
    keys = _jwks_keys(jwks) if jwks else state(ctx).keyring().signature_keys()
    verify = verify_refund_receipt if receipt_type(text) == REFUND_TYPE else verify_receipt
    checked = verify(text, keys)
    data = {"valid": True, **receipt_data(checked.claims)}
    emit(data, as_json=as_json, human=lambda: _render(data))


def _jwks_keys(path: Path) -> dict[str, VerificationKey]:
    """The keys of a JWKS file: a file that cannot be read names its path (FILE_UNAVAILABLE),
    one that is not a JWKS document is INVALID_INPUT."""
    from mcpbill_cli.keys import keys_from_jwks

    try:
        document = json.loads(path.read_bytes())
    except OSError as exc:
        raise FileUnavailable(f"cannot read --jwks {path}: {exc.strerror or exc}",
                              path=str(path)) from None
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"--jwks {path} is not JSON: {exc}", path=str(path)) from None
    try:
        return keys_from_jwks(document)
    except InvalidInput as exc:
        raise InvalidInput(f"--jwks {path}: {exc.message}", path=str(path)) from None
