"""`mcpbill keys list | rotate | export-jwks | retire`: the operator's signing keys."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mcpbill_cli.cli import complete
from mcpbill_cli.cli.confirm import YesOption, confirm
from mcpbill_cli.cli.options import DryRunOption
from mcpbill_cli.cli.output import (
    Column,
    JsonOption,
    OutputOption,
    emit,
    emit_listing,
    handles_errors,
    out,
    output_format,
    say,
    timestamp,
    to_jsonable,
)
from mcpbill_cli.cli.state import State, state
from mcpbill_cli.fsutil import write_atomic

if TYPE_CHECKING:
    from mcpbill_cli.keys import KeyInfo

app = typer.Typer(help="Signing keys for credit tokens and receipts.", no_args_is_help=True)

LIST_COLUMNS = (
    Column("kid", lambda k: k.kid, ident=True), Column("alg", lambda k: k.alg),
    Column("status", lambda k: k.status), Column("created", lambda k: k.created_at[:19]),
    Column("verifies until", lambda k: "-" if k.status == "active" else (
        k.verify_until or "never")[:19]),
)


def key_data(info: KeyInfo) -> dict[str, Any]:
    """A key as JSON, its times (kept as text in keyring.json) in the CLI's RFC 3339 form."""
    data: dict[str, Any] = to_jsonable(info)
    data["created_at"] = timestamp(info.created_at)
    data["verify_until"] = timestamp(info.verify_until)
    return data


@app.command("list")
@handles_errors
def list_keys(ctx: typer.Context, output: OutputOption = None,
              as_json: JsonOption = False) -> None:
    """List keys: kid, algorithm, status (active, verifying, retired) and until when."""
    chosen = output_format(output, as_json)
    keys = list(state(ctx).keyring().keys.values())
    emit_listing(keys, LIST_COLUMNS, output=chosen, records=[key_data(k) for k in keys])


@app.command("rotate")
@handles_errors
def rotate(
    ctx: typer.Context,
    alg: Annotated[str | None, typer.Option(
        "--alg", help="EdDSA, ES256 or HS256.", show_default="the active key's",
        autocompletion=complete.algorithms)] = None,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
) -> None:
    """Make a new active key. The old one keeps verifying until its last token expires."""
    from mcpbill_cli import keys

    st = state(ctx)
    # Under the ring's lock: no other rotation in between, and every token signed by the old
    # key is in the ledger before its last expiry is read.
    with keys.editing(st.settings.keys_dir, dry_run=dry_run) as ring:
        old = ring.active()
        new = keys.rotate(ring, alg, now=st.now(), last_expiry=_last_accepted(st, old.kid),
                          write=not dry_run)
    previous = ring.keys[old.kid]
    # a dry run draws no kid: the new key's would be drawn when it is made
    active = {**key_data(new), "kid": None} if dry_run else key_data(new)

    def human() -> None:
        if dry_run:
            say(f"would make a new {new.alg} key; {old.kid} would verify until "
                f"{previous.verify_until}")
            return
        say(f"{old.kid} verifies until {previous.verify_until}")
        out.print(new.kid)

    emit({"dry_run": dry_run, "active": active, "previous": key_data(previous)}, as_json=as_json,
         human=human)


def _last_accepted(st: State, kid: str) -> datetime | None:
    """Until when verifiers accept the last token ``kid`` signed: its exp and their leeway
    past it (None if it signed none)."""
    from mcpbill_cli.ledger.credit import last_expiry
    from mcpbill_cli.ledger.engine import reading

    with reading(st.engine()) as conn:
        until = last_expiry(conn, kid)
    return None if until is None else until + timedelta(seconds=st.settings.leeway)


@app.command("export-jwks")
@handles_errors
def export_jwks(
    ctx: typer.Context,
    out_file: Annotated[Path | None, typer.Option(
        "--out", help="Write to this file instead of stdout.")] = None,
    every: Annotated[bool, typer.Option(
        "--all", help="Every key ever used, rotated-out and retired ones too: to check old "
                      "receipts and seals offline. Never give it to a verifier of tokens.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Print the JWKS document of public keys that verify tokens now, for stateless verifiers;
    with --all, of every key ever used, for receipts and seals.

    Without --json, stdout is the JWKS itself: mcpbill keys export-jwks > jwks.json
    """
    document = state(ctx).keyring().jwks(every=every)
    text = json.dumps(document, indent=2) + "\n"
    if out_file is not None:
        write_atomic(out_file, text.encode())
    emit(document, as_json=as_json, human=lambda: say(
        f"wrote {len(document['keys'])} key(s) to {out_file}") if out_file else typer.echo(
        text, nl=False))


@app.command("retire")
@handles_errors
def retire(
    ctx: typer.Context,
    kid: Annotated[str, typer.Argument(help="The key to stop verifying with.",
                                       autocompletion=complete.key_ids)],
    force: Annotated[bool, typer.Option(
        "--force", help="Retire even though unexpired tokens signed by it would stop "
                        "verifying. Asks first; --yes in scripts.")] = False,
    yes: YesOption = False,
    as_json: JsonOption = False,
) -> None:
    """Stop verifying with a key now (for a compromised or unused key)."""
    from mcpbill_cli import keys
    from mcpbill_cli.errors import InvalidInput
    from mcpbill_cli.ledger.credit import live_tokens_signed_by
    from mcpbill_cli.ledger.engine import reading

    st = state(ctx)
    st.keyring().get(kid)
    now = st.now()
    with reading(st.engine()) as conn:
        live = live_tokens_signed_by(conn, kid, now=now)
    if live and not force:
        raise InvalidInput(f"{live} unexpired token(s) are signed by {kid} and would stop "
                           "verifying; pass --force to retire it anyway")
    if live:
        confirm(f"Retire {kid}: {live} unexpired token(s) signed by it stop verifying", yes=yes)
    # Read again under the lock rather than held across the question: a rotation and every
    # token issue would wait for the answer.
    with keys.editing(st.settings.keys_dir) as ring:
        info = keys.retire(ring, kid)
    emit(key_data(info), as_json=as_json, human=lambda: say(f"retired {kid}"))
