"""Questions to the person at the terminal, never asked when nobody is there to answer.

A script, a CI job or an agent runs mcpbill with stdin from a pipe or /dev/null: a prompt there
would read an empty line or hang, and end in "Aborted.". It gets a coded NO_TERMINAL error
naming the variable to set instead.
"""

from __future__ import annotations

import os
import sys

import typer

from mcpbill_cli.cli.output import is_terminal
from mcpbill_cli.errors import Interrupted, NoTerminal


def secret(variable: str, question: str, *, confirm: bool = False) -> str:
    """The secret in the environment ``variable``, else asked on the terminal, hidden."""
    value = os.environ.get(variable)
    if value:
        return value
    if not is_terminal(sys.stdin):
        raise NoTerminal(f"the {question} is needed and stdin is not a terminal to ask it on: "
                         f"set {variable}", variable=variable)
    try:
        return str(typer.prompt(question, hide_input=True, confirmation_prompt=confirm,
                                err=True))
    except typer.Abort as stopped:  # Ctrl-C, or Ctrl-D (end of input), at the prompt
        how = "Ctrl-C" if isinstance(stopped.__context__, KeyboardInterrupt) else "Ctrl-D"
        raise Interrupted(f"stopped at the {question} prompt ({how}): set {variable} to give "
                          "it without a prompt", variable=variable) from None
