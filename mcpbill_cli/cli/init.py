"""`mcpbill init`: a home with config, signing keys, a migrated ledger and a sample pricing file."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from mcpbill_cli.cli import complete
from mcpbill_cli.cli.confirm import YesOption, confirm
from mcpbill_cli.cli.output import JsonOption, emit, handles_errors, out, say
from mcpbill_cli.cli.state import state

if TYPE_CHECKING:
    from mcpbill_cli.setup import InitResult


@handles_errors
def init(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace existing signing keys (every token they signed stops "
                        "verifying; they are kept, retired, to check old receipts). Config, "
                        "pricing and ledger data are kept. Asks first; --yes in scripts.")
    ] = False,
    yes: YesOption = False,
    alg: Annotated[str, typer.Option(
        "--alg", help="Signing algorithm: EdDSA (default), ES256 or HS256.",
        autocompletion=complete.algorithms)] = "EdDSA",
    mode: Annotated[str, typer.Option(
        "--mode", help="demo (no chain; `wallet fund --demo` works) or live.")] = "demo",
    exist_ok: Annotated[bool, typer.Option(
        "--exist-ok", help="An initialized home is fine: exit 0 and change nothing.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Create the mcpbill home: config.toml, keys/, a migrated ledger and a sample pricing.toml.

    Running it again on an initialized home changes nothing and exits 7 (ALREADY_EXISTS), or
    0 with --exist-ok (for scripts that set up a home once); --force replaces the signing keys
    only.
    """
    from mcpbill_cli.errors import InvalidInput
    from mcpbill_cli.keys import KeyRing
    from mcpbill_cli.setup import initialize

    if force and exist_ok:
        raise InvalidInput("give --force (replace the keys) or --exist-ok (change nothing), "
                           "not both")
    settings = state(ctx).settings
    if force and KeyRing.exists(settings.keys_dir):
        confirm(f"Replace the signing keys in {settings.keys_dir}: tokens they signed stop "
                "verifying (the keys stay, retired, for old receipts)", yes=yes)
    result = initialize(settings, alg=alg, mode=mode, force=force, exist_ok=exist_ok)
    emit(result, as_json=as_json, human=lambda: _render(result))


def _render(result: InitResult) -> None:
    for line in result.steps:
        say(f"[green]✓[/] {line}")
    out.print(str(result.home))
