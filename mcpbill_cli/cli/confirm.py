"""Destructive commands ask first: on a terminal they prompt, in scripts they need --yes.

Without a terminal there is nobody to ask, so a command that would destroy something without
--yes is a coded refusal (CONFIRMATION_REQUIRED) that says to pass --yes: never a prompt
that reads a script's stdin, never a bare "Aborted.".
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mcpbill_cli.cli.output import is_terminal
from mcpbill_cli.errors import ConfirmationRequired

YesOption = Annotated[bool, typer.Option(
    "--yes", "-y", help="Go ahead without asking (needed where there is no terminal to ask on).")]


def confirm(action: str, *, yes: bool) -> None:
    """Return if the operator agrees to ``action`` (or passed --yes); refuse otherwise."""
    if yes:
        return
    if not (is_terminal(sys.stdin) and is_terminal(sys.stderr)):
        raise ConfirmationRequired(f"not confirmed: {action}. There is no terminal to ask on: "
                                   "pass --yes to go ahead. Nothing was changed.")
    try:
        agreed = typer.confirm(f"{action}. Go ahead?", default=False, err=True)
    except typer.Abort:  # Ctrl-D or Ctrl-C at the prompt
        agreed = False
    if not agreed:
        raise ConfirmationRequired(f"not confirmed: {action}. Nothing was changed.")
