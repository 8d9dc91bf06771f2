"""`mcpbill demo` as a newcomer runs it (`make demo`): in a pipe, on a terminal, with --json."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from mcpbill_cli.cli.output import receipt_data
from mcpbill_cli.keys import KeyRing
from mcpbill_cli.ledger.engine import make_engine, reading
from mcpbill_cli.ledger.models import calls
from mcpbill_cli.receipts import verify_receipt

DEMO = [sys.executable, "-m", "mcpbill_cli", "demo"]


def demo_env(tmp: Path) -> dict[str, str]:
    """The demo's throwaway home goes under ``tmp``, so a test sees what is left behind."""
    tmp.mkdir()
    return {**os.environ, "TMPDIR": str(tmp)}


def printed_receipts(stdout: str) -> list[dict[str, str]]:
    """The receipt blocks on stdout (between them, the refusals as JSON): indented
    "name  value" lines from the receipt id on, a blank line after each."""
    blocks = re.findall(r"^    receipt_id .*?(?=\n\n)", stdout, flags=re.MULTILINE | re.DOTALL)
    return [dict(line.strip().split(maxsplit=1) for line in block.splitlines())
            for block in blocks]


def ledger_receipts(home: Path) -> dict[str, dict[str, str]]:
    """Every captured call's receipt, verified with the home's keys, as the demo prints it."""
    keys = KeyRing.load(home / "keys").verification_keys()
    engine = make_engine(f"sqlite:///{home / 'ledger.db'}")
    with reading(engine) as conn:
        stored = conn.execute(select(calls.c.receipt).where(calls.c.status == "captured"))
        jws = [row.receipt for row in stored]
    engine.dispose()
    shown = {}
    for fields in (receipt_data(verify_receipt(text, keys).claims) for text in jws):
        shown[fields["receipt_id"]] = {name: value if isinstance(value, str) else json.dumps(value)
                                       for name, value in fields.items()}
    return shown


@pytest.mark.slow
def test_each_receipt_is_printed_verified_and_the_home_kept_when_asked(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    proc = subprocess.run([*DEMO, "--keep"], env=demo_env(tmp), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    kept = "demo ledger and server log kept in "
    assert proc.stderr.splitlines()[-1].startswith(kept), proc.stderr
    home = Path(proc.stderr.splitlines()[-1].removeprefix(kept))
    assert home.parent == tmp and (home / "ledger.db").is_file()
    printed = printed_receipts(proc.stdout)
    captured = ledger_receipts(home)
    assert len(printed) == len(captured) > 10  # each receipt once (the replay is not reprinted)
    assert {block["receipt_id"]: block for block in printed} == captured
    announced = [line for line in proc.stderr.splitlines() if line.startswith("receipt ")]
    assert len(announced) == len(printed)
    assert all(line.endswith("signature verified") for line in announced)


@pytest.mark.slow
def test_on_a_terminal_the_demo_shows_receipts_and_removes_its_home(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    controller, terminal = os.openpty()
    proc = subprocess.Popen(DEMO, env=demo_env(tmp), stdin=subprocess.DEVNULL, stdout=terminal,
                            stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the demo closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert proc.wait(timeout=300) == 0, shown.decode()
    text = shown.decode().replace("\r\n", "\n")
    assert "receipt search: charged 0.002, 0.048 left; signature verified" in text
    assert text.count("    receipt_id       rcpt_") > 10 and "[green]" not in text
    assert "removed the demo home (run with --keep to look into it)" in text
    assert list(tmp.iterdir()) == []


@pytest.mark.slow
def test_the_json_document_says_the_home_is_gone(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    proc = subprocess.run([*DEMO, "--json"], env=demo_env(tmp), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    assert document["status"] == "ok" and document["data"]["kept"] is False
    assert not Path(document["data"]["home"]).exists() and list(tmp.iterdir()) == []
    receipts = [step["data"] for step in document["data"]["steps"] if step["kind"] == "receipt"]
    assert receipts and all(receipt["receipt_id"].startswith("rcpt_") for receipt in receipts)


@pytest.mark.slow
def test_an_interrupted_demo_keeps_its_home_and_says_where(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    with subprocess.Popen(DEMO, env=demo_env(tmp), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("receipt "):
                proc.send_signal(signal.SIGINT)  # Ctrl-C in the middle of the calls
                break
        rest = proc.stderr.read()
    assert proc.wait(timeout=60) != 0, rest
    [home] = tmp.iterdir()
    assert f"the demo stopped; its home is kept in {home} (server log: server.log)" in rest
    assert (home / "ledger.db").is_file() and (home / "server.log").is_file()


def test_a_home_that_is_not_new_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "MCPBILL_HOME": str(home)}
    subprocess.run([sys.executable, "-m", "mcpbill_cli", "init", "--json"], env=env,
                   capture_output=True, check=True, timeout=60)
    before = {path: path.read_bytes() for path in home.rglob("*") if path.is_file()}

    proc = subprocess.run([*DEMO, "--home", str(home), "--json"], capture_output=True,
                          text=True, timeout=60, check=False)

    assert proc.returncode == 7, proc.stderr
    [error] = json.loads(proc.stdout)["errors"]
    assert (error["code"], error["field"]) == ("ALREADY_EXISTS", "home")
    assert "--force" not in error["message"] and "kept" not in proc.stderr
    assert {path: path.read_bytes() for path in home.rglob("*") if path.is_file()} == before
    as_text = subprocess.run([*DEMO, "--home", str(home / "config.toml")], capture_output=True,
                             text=True, timeout=60, check=False)
    assert as_text.returncode == 7 and as_text.stderr.startswith("error ALREADY_EXISTS: --home")
