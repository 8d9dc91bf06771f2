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
        "--out", help="Write to this file (atomically) instead of stdout. A file that holds "
                      "seals already is continued: its seals must be the ledger's, and only "
                      "later ones are added.")] = None,
    after: Annotated[int | None, typer.Option(
        "--after", min=0, help="Only seals numbered after this one (with --out FILE that "
                               "holds seals: its last seal, the default).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Write the seals as JSON lines, one seal each, to keep outside the database.

    Each line has the seal's number, event span and count, batch hash, previous seal's hash,
    hash, time, kid and JWS; `keys export-jwks` verifies the JWS offline. Run it again on the
    same file (from cron) to add the seals made since: the file's seals are first checked
    against the ledger's, and a ledger whose seals differ from the file's (its trail rewritten
    since) is AUDIT_CHAIN_BROKEN, the file left as it was. With --json, --out is required and
    stdout carries the summary document. Example: mcpbill audit seals export --out seals.jsonl
    """
    from mcpbill_cli.errors import InvalidInput
    from mcpbill_cli.fsutil import write_atomic
    from mcpbill_cli.ledger.engine import reading
    from mcpbill_cli.ledger.seals import read_seals

    if as_json and out_file is None:
        raise InvalidInput("with --json, stdout carries the summary: write the seals to a "
                           "file with --out FILE")
    kept, kept_text = _archive(out_file) if out_file is not None else ({}, b"")
    if kept:
        last_kept = max(kept)
        if after is not None and after != last_kept:
            raise InvalidInput(f"{out_file} ends at seal {last_kept}: continue it with --after "
                               f"{last_kept} (or leave --after out)", field="after")
        after = last_kept
    with reading(state(ctx).engine()) as conn:
        _check_archive(conn, kept, out_file)
        seals = [{"schema_version": SEALS_EXPORT_VERSION, **seal_data(s)}
                 for s in read_seals(conn, first=(after or 0) + 1)]
    text = "".join(json.dumps(s, sort_keys=True) + "\n" for s in seals)
    if out_file is None:
        typer.echo(text, nl=False)
        return
    write_atomic(out_file, kept_text + text.encode())
    data = {"seals": len(seals), "first": seals[0]["seal"] if seals else None,
            "last": seals[-1]["seal"] if seals else None, "out": str(out_file),
            "kept": len(kept)}
    emit(data, as_json=as_json, human=lambda: say(
        f"wrote {len(seals)} seal(s) to {out_file}"
        + (f" after the {len(kept)} it held" if kept else "")))


def _archive(path: Path) -> tuple[dict[int, str], bytes]:
    """The seals a ``seals export`` file holds (number: hash) and its bytes; none when the
    file does not exist or is empty. INVALID_INPUT for a file that is not such an export."""
    from mcpbill_cli.errors import FileUnavailable, InvalidInput

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}, b""
    except OSError as error:  # a directory, no permission
        raise FileUnavailable(f"cannot read {path}: {error.strerror or error}",
                              path=str(path)) from None
    kept: dict[int, str] = {}
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            seal = json.loads(line)
            kept[int(seal["seal"])] = str(seal["hash"])
        except (ValueError, TypeError, KeyError):
            raise InvalidInput(f"--out {path} is not a seals export (line {number}); nothing "
                               "was written: give a new file, or one this command wrote",
                               field="out") from None
    if raw and not raw.endswith(b"\n"):
        raise InvalidInput(f"--out {path} ends in a cut line; nothing was written",
                           field="out")
    return kept, raw


def _check_archive(conn: Any, kept: dict[int, str], path: Path | None) -> None:
    """AUDIT_CHAIN_BROKEN unless every seal the file kept is the ledger's, hash for hash."""
    from sqlalchemy import select

    from mcpbill_cli.errors import AuditChainBroken
    from mcpbill_cli.ledger.models import seals

    if not kept:
        return
    written = dict(conn.execute(select(seals.c.number, seals.c.hash).where(
        seals.c.number >= min(kept), seals.c.number <= max(kept))).all())
    for number in sorted(kept):
        if written.get(number) != kept[number]:
            now = written.get(number)
            raise AuditChainBroken(
                f"seal {number} in {path} is not the ledger's ("
                + (f"hash {kept[number][:12]}... there, {now[:12]}... here" if now
                   else "the ledger has no such seal")
                + "): the audit trail was rewritten since the file was written. Nothing was "
                  "written; keep the file, and run `mcpbill reconcile --chain full`",
                seal=number, out=str(path))
