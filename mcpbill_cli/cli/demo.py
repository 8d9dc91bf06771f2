"""`mcpbill demo`: watch a paid-call loop run end to end, over MCP, on a throwaway home."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mcpbill_cli.cli.output import (
    JsonOption,
    emit,
    handles_errors,
    out,
    receipt_data,
    say,
    wire_to_cli,
)

if TYPE_CHECKING:
    from mcpbill_cli.demo import DemoStep


@handles_errors
def demo(
    home: Annotated[Path | None, typer.Option(
        "--home", help="Run in this home instead of a fresh temporary one (must be new); "
                       "it is kept.")
    ] = None,
    keep: Annotated[bool, typer.Option(
        "--keep", help="Keep the temporary home (ledger, keys, server log) to look into after.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Init a demo home, fund $10, issue a $0.05 token, call a paid MCP server until it runs out.

    Runs examples/paid_server.py over stdio and calls it with the MCP client, as an agent would.

    Shows each signed receipt's verified fields, each BUDGET_EXCEEDED with its fallback hints,
    then a reconcile. The temporary home is removed at the end unless --keep.

    Needs the MCP SDK: pip install 'mcpbill\\[mcp]'.
    """
    from mcpbill_cli.demo import run_demo

    if home is not None:
        _require_new(home)
    where = home or Path(tempfile.mkdtemp(prefix="mcpbill-demo-"))
    kept = keep or home is not None
    steps = []
    try:
        for step in run_demo(where):
            steps.append(step)
            if not as_json:
                _show(step.kind, step.text, step.data)
    except BaseException:
        say(f"the demo stopped; its home is kept in {where} (server log: server.log)")
        raise
    if not kept:
        shutil.rmtree(where)
    emit({"home": str(where), "kept": kept, "steps": [_step_data(s) for s in steps]},
         as_json=as_json, human=lambda: say(
             f"demo ledger and server log kept in {where}" if kept
             else "removed the demo home (run with --keep to look into it)"))


def _require_new(home: Path) -> None:
    """ALREADY_EXISTS for a ``--home`` that holds anything: the demo writes its own keys,
    ledger and pricing, and never into a home (or any directory) that was there before."""
    from mcpbill_cli.errors import AlreadyExists

    if home.exists() and (not home.is_dir() or any(home.iterdir())):
        raise AlreadyExists(f"--home {home} is not new: the demo makes a home of its own there; "
                            "give a path that does not exist yet (or an empty directory), or "
                            "leave --home out for a temporary one", field="home")


def _step_data(step: DemoStep) -> dict[str, Any]:
    """A step as CLI data: its `_meta` payload (a receipt, a refusal) in snake_case."""
    paid = step.kind in ("receipt", "replay")
    return {"kind": step.kind, "text": step.text,
            "data": receipt_data(step.data) if paid else wire_to_cli(step.data)}


def _show(kind: str, text: str, data: dict[str, object]) -> None:
    if kind == "refusal":
        say(f"[yellow]refused[/] {data.get('code')}: {text}")
        out.print(json.dumps(data, indent=2))
    elif kind == "receipt":
        say(f"[green]receipt[/] {text}")
        _print_receipt(data)
    elif kind == "free":
        say(f"[cyan]free[/] {text}")
    elif kind == "fallback":
        say(f"[yellow]fallback[/] {text}")
    elif kind == "replay":
        say(f"[green]replay[/] {text} [dim]({data.get('receiptId')})[/]")
    else:
        say(text)


def _print_receipt(receipt: dict[str, object]) -> None:
    """The verified receipt's signed fields on stdout (the data; the line announcing it is
    talk, on stderr), one "name  value" line each, receipt id first, a blank line after: plain
    text that reads the same on a terminal, in a pipe or in a log."""
    fields = receipt_data({name: value for name, value in receipt.items() if name != "jws"})
    fields = {"receipt_id": fields.pop("receipt_id"), **fields}
    width = max(len(name) for name in fields)
    sys.stdout.write("".join(f"    {name:<{width}}  {_shown(value)}\n"
                             for name, value in fields.items()) + "\n")
    sys.stdout.flush()  # a pipe must not hold it back behind the talk on stderr


def _shown(value: object) -> str:
    """Text as it is; numbers and booleans as in the JSON (``true``, not ``True``)."""
    return value if isinstance(value, str) else json.dumps(value)
