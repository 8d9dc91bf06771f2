"""CPU instructions per paid call: the verifier's begin (hold) + capture, the floor under it, and
what billing adds to a whole MCP call.

Wall time on a shared machine moves by tens of percent from one run to the next; instruction
counts under valgrind's callgrind move by about one. This runs itself under callgrind twice
per path, with ``--calls`` and three times as many, on ``bench/mcp_overhead.py``'s setup (a
demo-mode SQLite ledger, one token, one paid tool), and prints the difference divided by the
extra calls: what one more call costs, with start-up, imports and warm-up cancelled out.

- ``verifier``: ``Verifier.begin`` then ``Verifier.capture``, called directly;
- ``floor``: the rows a billed call writes as hand-written SQL on the raw driver, plus the
  receipt's signature (``mcp_overhead.ledger_writes_alone``);
- ``billed`` and ``unbilled``: whole MCP tool calls through the SDK's in-memory transport, as
  ``mcp_overhead`` makes them. Billed minus unbilled is what billing adds to a call; that
  minus the verifier alone is the MCP integration's share (the glue);
- ``self_billed``: an unbilled tool making the same begin and capture itself
  (``mcp_overhead.add_self_billed``): billed minus it is the glue alone, without the
  verifier's own instructions that differ inside a call (its caches, the worker thread).

The verifier's background threads (sealer, WAL checkpointer) are stopped before counting:
they wake on the clock, and under callgrind a call takes many times as long, so their work
would weigh many times over. The log is checkpointed before counting, as its size changes
what a lookup in it costs. The process ends right after the counted calls, without closing
the verifier: its sealer's last turn would seal their events, and SQLite's last connection
would checkpoint their log into the database, work that grows with the calls and that a
server does off the call path (counted, the verifier's path came out at 2.3-2.5M instructions
per call instead of 1.8-2.1M, the floor's at 1.56M instead of 1.42M). Even so, runs of the
same code differ by up to 150k per call: compare paths within a few percent over several runs.

Usage: python bench/instructions.py [--calls N]   (needs valgrind)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import cast

import anyio
import jwt
from mcp.client import Client
from mcp_types import RequestParamsMeta

sys.path.insert(0, str(Path(__file__).parent))
import mcp_overhead  # noqa: E402 - a sibling script, not a package

from mcpbill_cli.keys import KeyRing  # noqa: E402
from mcpbill_cli.mcp import TOKEN_META, Billing  # noqa: E402
from mcpbill_cli.verifier import Verifier  # noqa: E402

PATHS = ("verifier", "floor", "billed", "unbilled", "self_billed")
WARM_UP = 300  # calls before counting: tables and caches of a running server
_COLLECTED = re.compile(r"Collected : (\d+)")


def run(path: str, calls: int) -> None:
    """The measured part, in this process (under callgrind): set up, warm up, run; then leave
    at once (:func:`_leave`)."""
    root = tempfile.mkdtemp(prefix="mcpbill-bench-")
    try:
        _run_in(Path(root), path, calls)
    finally:
        shutil.rmtree(root)
    _leave()


def _run_in(root: Path, path: str, calls: int) -> None:
    """Set up, warm up, run ``calls`` of ``path``, in ``root``; the verifier is left open."""
    settings = mcp_overhead.make_home(root)
    token = mcp_overhead.issue(settings, 10_000_000)
    verifier = Verifier.from_settings(settings)
    _stop_background(verifier)
    mcp_overhead.verifier_alone(verifier, token, WARM_UP)
    database = root / "ledger.db"
    _truncate_log(database)
    if path == "verifier":
        mcp_overhead.verifier_alone(verifier, token, calls)
    elif path in ("billed", "unbilled", "self_billed"):
        anyio.run(_mcp_calls, verifier, token, database, path, calls)
    else:
        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
        signer = KeyRing.load(settings.keys_dir).signing_key()[1]
        mcp_overhead.ledger_writes_alone(database, jti, signer.sign, calls)


async def _mcp_calls(verifier: Verifier, token: str, database: Path, path: str,
                     calls: int) -> None:
    """``calls`` calls of the billed echo, the unbilled one or the self-billed one, after
    warming it up."""
    server = mcp_overhead.build_server(Billing(verifier))
    mcp_overhead.add_self_billed(server, verifier, token)
    tool = {"billed": "echo", "unbilled": "echo_unbilled",
            "self_billed": "echo_self_billed"}[path]
    meta = cast(RequestParamsMeta, {TOKEN_META: token})
    async with Client(server) as client:
        await mcp_overhead.per_call(client, tool, meta, WARM_UP)
        _truncate_log(database)
        await mcp_overhead.per_call(client, tool, meta, calls)


def _leave() -> None:
    """End the process at once: no close, no sealing (see the module's docstring)."""
    sys.stdout.flush()
    os._exit(0)


def _stop_background(verifier: Verifier) -> None:
    """Stop the sealer's and the checkpointer's threads (see the module's docstring)."""
    for worker in (verifier._sealer, verifier._checkpointer):
        if worker is not None:
            worker.close()  # both may be closed again: Verifier.close does


def _truncate_log(database: Path) -> None:
    db = sqlite3.connect(database)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def instructions(path: str, calls: int) -> int:
    """Instructions callgrind counted in a whole run of ``path`` with ``calls`` calls."""
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         __file__, "--run", path, "--calls", str(calls)],
        capture_output=True, text=True, check=True)
    found = _COLLECTED.search(done.stderr)
    if found is None:
        raise SystemExit(f"no count from callgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description="instructions per paid call (callgrind)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--run", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run(args.run, args.calls)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    per_call = {}
    for path in PATHS:
        extra = instructions(path, 3 * args.calls) - instructions(path, args.calls)
        per_call[path] = extra / (2 * args.calls)
    print(f"callgrind, demo-mode SQLite ledger, {args.calls} and {3 * args.calls} calls")
    for path, count in per_call.items():
        print(f"{path:8}  {count / 1000:8.0f}k instructions per call")
    print(f"verifier / floor  {per_call['verifier'] / per_call['floor']:.2f}x")
    billing = per_call["billed"] - per_call["unbilled"]
    print(f"billed - unbilled {billing / 1000:8.0f}k: what billing adds to an MCP call")
    print(f"  - verifier      {(billing - per_call['verifier']) / 1000:8.0f}k: the MCP glue")
    glue = per_call["billed"] - per_call["self_billed"]
    print(f"billed - self_billed {glue / 1000:5.0f}k: the glue alone (the same begin + capture "
          "made by an unbilled tool)")


if __name__ == "__main__":
    main()
