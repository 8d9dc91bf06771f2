"""`mcpbill version`: this mcpbill's version, and the Python it runs on (for bug reports)."""

from __future__ import annotations

import platform

import typer

from mcpbill_cli.__about__ import __version__
from mcpbill_cli.cli.output import JsonOption, emit, handles_errors


@handles_errors
def version(as_json: JsonOption = False) -> None:
    """Print the version of mcpbill (the same as `mcpbill --version`).

    With --json: {"version", "python", "schema_revision"}, the last being the ledger schema
    this version reads and writes.
    """
    from mcpbill_cli.ledger.models import SCHEMA_REVISION

    data = {"version": __version__, "python": platform.python_version(),
            "schema_revision": SCHEMA_REVISION}
    emit(data, as_json=as_json, human=lambda: typer.echo(f"mcpbill {__version__}"))
