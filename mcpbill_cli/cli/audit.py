"""`mcpbill audit seal | seals export`: seal the audit trail, and keep its seals elsewhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mcpbill_cli.cli.output import JsonOption, emit, handles_errors, say, wire_to_cli
from mcpbill_cli.cli.state import state

if TYPE_CHECKING:
    from mcpbill_cli.ledger.seals import Seal

# Version 2 of a `seals export` line: snake_case fields, `sealed_at` in RFC 3339 `Z` form.
# Version 1 (no `schema_version` field) had the JWS payload's camelCase names.
SEALS_EXPORT_VERSION = 2

app = typer.Typer(
    help="The audit trail: events are sealed in signed batches (verifiers seal every second; "
         "reconcile checks every seal).",
    no_args_is_help=True)
seals_app = typer.Typer(help="The seals of the audit trail.", no_args_is_help=True)
app.add_typer(seals_app, name="seals")


def seal_data(seal: Seal) -> dict[str, Any]:
    """A seal in the CLI's contract; its JWS signs the same fields under their camelCase wire
    names (``firstId``, ``sealedAt``, ...), and ``hash`` is computed over those."""
    data: dict[str, Any] = wire_to_cli(seal.to_dict())
    if seal.money is not None:  # micro-USDC integers, named so (nets may be negative)
        claim = seal.money.claim()
        data["money"] = {"transfers": claim["transfers"], "amount_micro": claim["amount"],
                         "posted_micro": claim["posted"], "pending_micro": claim["pending"]}
    return data


@app.command("seal")
@handles_errors
def seal(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Seal every committed, unsealed event now, signed with the home's signing key.

    Safe beside running verifiers and other sealers: they take turns. Example: run it from
    cron where no verifier runs, so the trail never stays unsealed.
    """
    from mcpbill_cli.ledger.sealing import seal_all
    from mcpbill_cli.ledger.seals import signer

    st = state(ctx)
    info, key = st.keyring().signing_key()
    sealed = seal_all(st.engine(), signer(info.alg, info.kid, key), clock=st.clock(), wait=True)
    data = {"seals": [seal_data(s) for s in sealed], "events": sum(s.count for s in sealed)}
    emit(data, as_json=as_json, human=lambda: say(
        f"sealed {data['events']} event(s) in {len(sealed)} seal(s)" if sealed
        else "nothing to seal"))


@seals_app.command("export")
@handles_errors
def export(
    ctx: typer.Context,
    out_file: Annotated[Path | None, typer.Option(
        "--out", help="Write to this file (atomically) instead of stdout.")] = None,
    after: Annotated[int, typer.Option(
        "--after", min=0, help="Only seals numbered after this one (to append to a copy).")
    ] = 0,
    as_json: JsonOption = False,
) -> None:
    """Write the seals as JSON lines, one seal each, to keep outside the database.

    Each line has the seal's number, event span and count, batch hash, previous seal's hash,
    hash, time, kid and JWS; `keys export-jwks` verifies the JWS offline. With --json, --out
    is required and stdout carries the summary document. Example: mcpbill audit seals export
    --after 41 --out seals.jsonl
    """
    from mcpbill_cli.errors import InvalidInput
    from mcpbill_cli.fsutil import write_atomic
    from mcpbill_cli.ledger.engine import reading
    from mcpbill_cli.ledger.seals import read_seals

    if as_json and out_file is None:
        raise InvalidInput("with --json, stdout carries the summary: write the seals to a "
                           "file with --out FILE")
    with reading(state(ctx).engine()) as conn:
        seals = [{"schema_version": SEALS_EXPORT_VERSION, **seal_data(s)}
                 for s in read_seals(conn, first=after + 1)]
    text = "".join(json.dumps(s, sort_keys=True) + "\n" for s in seals)
    if out_file is None:
        typer.echo(text, nl=False)
        return
    write_atomic(out_file, text.encode())
    data = {"seals": len(seals), "first": seals[0]["seal"] if seals else None,
            "last": seals[-1]["seal"] if seals else None, "out": str(out_file)}
    emit(data, as_json=as_json, human=lambda: say(f"wrote {len(seals)} seal(s) to {out_file}"))
