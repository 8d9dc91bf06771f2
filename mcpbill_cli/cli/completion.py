"""`mcpbill completion bash|zsh|fish`: print a shell completion script."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpbill_cli.cli.complete import script
from mcpbill_cli.cli.output import JsonOption, emit, handles_errors
from mcpbill_cli.errors import InvalidInput

SHELLS = ("bash", "zsh", "fish")


def _shells(incomplete: str) -> list[str]:
    return [shell for shell in SHELLS if shell.startswith(incomplete)]


@handles_errors
def completion(
    shell: Annotated[str, typer.Argument(help="bash, zsh or fish.", autocompletion=_shells)],
    as_json: JsonOption = False,
) -> None:
    """Print the completion script. Example: mcpbill completion bash > ~/.mcpbill-complete.bash"""
    if shell not in SHELLS:
        raise InvalidInput(f"shell {shell!r} is not one of {', '.join(SHELLS)}")
    text = script(shell)
    emit({"shell": shell, "script": text}, as_json=as_json,
         human=lambda: typer.echo(text, nl=False))
