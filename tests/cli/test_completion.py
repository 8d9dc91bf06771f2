"""Shell completion as each shell runs it: bash, zsh and fish load `mcpbill completion SHELL` and
complete a command line against a real home and ledger, through ``mcpbill`` on PATH."""

from __future__ import annotations

import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli.conftest import Invoke, ok_json

BIN = Path(sys.executable).parent
TIMEOUT = 30

Complete = Callable[[str], list[str]]


def _shell(name: str) -> str:
    """The shell's path; without it the test is skipped, but not in CI, which installs it."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed: .ci/run installs it")
        pytest.skip(f"{name} is not installed")
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    """This test's MCPBILL_* settings, this venv's mcpbill first on PATH, and a throwaway HOME."""
    assert (BIN / "mcpbill").exists(), BIN
    shell_home = tmp_path / "shell-home"
    shell_home.mkdir(exist_ok=True)
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(shell_home), "XDG_CONFIG_HOME": str(shell_home / ".config"),
            "XDG_DATA_HOME": str(shell_home / ".local" / "share")}


def _on_terminal(argv: list[str], setup: str, line: str, env: dict[str, str],
                 capture: Path) -> list[str]:
    """Start an interactive shell on a pseudo-terminal, run ``setup``, type ``line`` and TAB;
    ``setup`` wraps the shell's completion so that it appends each value it offers to
    ``capture`` as ``>value``, then ``::done::``."""
    capture.write_text("")
    primary, secondary = os.openpty()
    proc = subprocess.Popen(argv, stdin=secondary, stdout=secondary, stderr=secondary,
                            env={**env, "CAPTURE": str(capture)}, start_new_session=True)
    os.close(secondary)
    try:
        os.write(primary, setup.lstrip().encode() + line.encode() + b"\t")
        deadline = time.monotonic() + TIMEOUT
        while "::done::" not in capture.read_text():
            assert time.monotonic() < deadline, f"{argv[0]} did not complete {line!r}"
            if select.select([primary], [], [], 0.05)[0]:
                os.read(primary, 65536)  # keep the terminal drained so the shell never blocks
    finally:
        proc.kill()
        proc.wait()
        os.close(primary)
    return [_as_read(line[1:]) for line in capture.read_text().splitlines()
            if line.startswith(">")]


def _as_read(word: str) -> str:
    """A completion as the shell will read it once inserted: one word, quotes removed."""
    (read,) = shlex.split(word)
    return read


# bash: readline splits the line into COMP_WORDS and calls the function registered for mcpbill;
# a wrapper around it records COMPREPLY.
BASH_SETUP = r"""
PS1=''
eval "$(mcpbill completion bash)"
spec=$(complete -p mcpbill); registered=${spec##*-F }; registered=${registered%% *}
record() {
  "$registered" "$@"
  for reply in "${COMPREPLY[@]}"; do printf '>%s\n' "$reply"; done >> "$CAPTURE"
  echo ::done:: >> "$CAPTURE"
}
complete -o default -F record mcpbill
"""


def bash_complete(line: str, env: dict[str, str], capture: Path) -> list[str]:
    argv = [_shell("bash"), "--norc", "--noprofile", "-i"]
    return _on_terminal(argv, BASH_SETUP, line, env, capture)


# zsh: compinit and the script, and compadd wrapped to record the matches it adds; a
# post-completion hook marks the end.
ZSH_SETUP = r"""
PROMPT=''
autoload -Uz compinit && compinit -u -D
source <(mcpbill completion zsh)
compadd() {
  if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return; fi
  local -a hits
  builtin compadd -A hits "$@"
  (( $#hits )) && print -rl -- ">"$^hits >> "$CAPTURE"
  builtin compadd "$@"
}
mark_done() { print -r -- '::done::' >> "$CAPTURE" }
comppostfuncs=(mark_done)
bindkey '^I' complete-word
"""


def zsh_complete(line: str, env: dict[str, str], capture: Path) -> list[str]:
    return _on_terminal([_shell("zsh"), "-f", "-i"], ZSH_SETUP, line, env, capture)


# fish: its own `complete --do-complete`, which prints "value<TAB>description" per completion.
FISH = "mcpbill completion fish | source; or exit 9; complete --do-complete -- $argv[1]"


def fish_complete(line: str, env: dict[str, str], capture: Path) -> list[str]:
    proc = subprocess.run([_shell("fish"), "--no-config", "-c", FISH, line], capture_output=True,
                          text=True, env=env, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0 and proc.stderr == "", (proc.returncode, proc.stderr)
    return [entry.split("\t")[0] for entry in proc.stdout.splitlines() if entry]


SHELLS = {"bash": bash_complete, "zsh": zsh_complete, "fish": fish_complete}


@pytest.fixture(params=list(SHELLS))
def complete(request: pytest.FixtureRequest, tmp_path: Path) -> Complete:
    """``complete("mcpbill tok")``: what the shell offers on TAB after that line."""
    env, runner = _env(tmp_path), SHELLS[request.param]
    return lambda line: runner(line, env, tmp_path / "capture")


def _issue(cli: Invoke, *args: str) -> dict[str, str]:
    return dict(ok_json(cli("token", "issue", "--limit", "1", *args, "--json")))


# Each shell on SQLite; the lookups themselves run on both ledgers in the next test.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_commands_options_and_ledger_values_complete(ledger_cli: Invoke,
                                                     complete: Complete) -> None:
    assert ledger_cli("wallet", "fund", "--tenant", "acme", "--demo", "10").exit_code == 0
    assert ledger_cli("wallet", "fund", "--tenant", "o'brien & co", "--demo", "1").exit_code == 0
    kept = _issue(ledger_cli, "--tenant", "acme", "--agent", "crawler")
    revoked = _issue(ledger_cli, "--tenant", "acme", "--agent", "crawler")
    assert ledger_cli("revoke", revoked["jti"]).exit_code == 0

    assert complete("mcpbill tok") == ["token"]
    assert complete("mcpbill token issue --sc") == ["--scope"]
    assert complete("mcpbill revoke ") == [kept["jti"]]
    assert complete("mcpbill token issue --parent tok_") == [kept["jti"]]
    assert sorted(complete("mcpbill token show ")) == sorted([kept["jti"], revoked["jti"]])
    assert complete("mcpbill wallet fund --tenant ") == ["acme", "o'brien & co"]
    assert complete("mcpbill wallet fund --tenant o") == ["o'brien & co"]
    assert complete("mcpbill reconcile -t a") == ["acme"]
    assert complete("mcpbill token list --agent ") == ["crawler"]
    # the sample pricing.toml `init` wrote: search, status, summarize (and acme's own search)
    assert sorted(complete("mcpbill pricing set s")) == ["search", "status", "summarize"]
    assert sorted(complete("mcpbill wallet sync --chain base")) == ["base", "base-sepolia"]
    kids = [key["kid"] for key in ok_json(ledger_cli("keys", "list", "--json"))]
    assert complete("mcpbill keys retire ") == kids


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("shell", "offered"), [
    ("bash", "acme"),  # bash completes the word after the `=`
    ("zsh", "--tenant=acme"), ("fish", "--tenant=acme"),  # zsh and fish, the whole word
])
def test_option_equals_value_completes(ledger_cli: Invoke, tmp_path: Path, shell: str,
                                       offered: str) -> None:
    assert ledger_cli("wallet", "fund", "--tenant", "acme", "--demo", "1").exit_code == 0
    env, capture = _env(tmp_path), tmp_path / "capture"
    assert SHELLS[shell]("mcpbill wallet fund --tenant=a", env, capture) == [offered]
    assert SHELLS[shell]("mcpbill wallet fund --tenant=", env, capture) == [offered]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("shell", "typed"), [
    # a word typed with an escaped space is one word, not a finished word and a new empty one
    ("bash", "o\\'brien\\ "), ("zsh", "o\\'brien\\ "), ("fish", "o\\'brien\\ "),
    # an open quote (zsh hands its completion system the word without the quote's meaning)
    ("bash", "\"o'brien "), ("fish", "\"o'brien "),
])
def test_a_value_typed_with_a_space_completes(ledger_cli: Invoke, tmp_path: Path, shell: str,
                                              typed: str) -> None:
    assert ledger_cli("wallet", "fund", "--tenant", "o'brien & co", "--demo", "1").exit_code == 0
    assert ledger_cli("wallet", "fund", "--tenant", "o'brien", "--demo", "1").exit_code == 0
    env, capture = _env(tmp_path), tmp_path / "capture"
    assert SHELLS[shell](f"mcpbill wallet fund --tenant {typed}", env, capture) == [
        "o'brien & co"]


def test_jti_lookup_works_on_both_ledgers(ledger_cli: Invoke, tmp_path: Path) -> None:
    assert ledger_cli("wallet", "fund", "--tenant", "acme", "--demo", "3").exit_code == 0
    issued = _issue(ledger_cli, "--tenant", "acme")
    env, capture = _env(tmp_path), tmp_path / "capture"
    assert bash_complete(f"mcpbill revoke {issued['jti'][:8]}", env, capture) == [issued["jti"]]
    assert bash_complete("mcpbill token issue -t ac", env, capture) == ["acme"]
    assert bash_complete("mcpbill revoke tok_nothing", env, capture) == []


def test_completion_never_prints_a_token(ledger_cli: Invoke, tmp_path: Path) -> None:
    assert ledger_cli("wallet", "fund", "--tenant", "acme", "--demo", "3").exit_code == 0
    issued = _issue(ledger_cli, "--tenant", "acme")
    env = {**_env(tmp_path), "_MCPBILL_COMPLETE": "complete_fish",
           "_TYPER_COMPLETE_FISH_ACTION": "get-args",
           "_TYPER_COMPLETE_ARGS": "mcpbill revoke "}
    proc = subprocess.run([BIN / "mcpbill"], capture_output=True, text=True, env=env,
                          timeout=TIMEOUT, check=False)
    assert proc.stdout.splitlines() == [f"{issued['jti']}\tacme/agent"]
    assert issued["token"] not in proc.stdout + proc.stderr


@pytest.mark.parametrize("setting", ["missing home", "unreachable ledger", "corrupt ledger",
                                     "corrupt config", "corrupt keyring"])
def test_no_ledger_means_no_values_and_nothing_created(setting: str, tmp_path: Path,
                                                       isolated_home: Path) -> None:
    env = _env(tmp_path)
    if setting == "unreachable ledger":
        env["MCPBILL_DB_URL"] = "postgresql+psycopg://nobody@127.0.0.1:1/ledger"
    elif setting == "corrupt ledger":
        isolated_home.mkdir()
        (isolated_home / "ledger.db").write_bytes(b"not a database" * 100)
    elif setting == "corrupt keyring":
        (isolated_home / "keys").mkdir(parents=True)
        (isolated_home / "keys" / "keyring.json").write_text('{"keys": [{"kid": ""}, 3, "x"]}')
    elif setting == "corrupt config":
        isolated_home.mkdir()
        (isolated_home / "config.toml").write_bytes(b"\x00\xff[[ not toml")
    capture = tmp_path / "capture"
    capture.touch()
    before = sorted(tmp_path.rglob("*"))
    for line in ("mcpbill revoke ", "mcpbill wallet fund --tenant ", "mcpbill pricing set ",
                 "mcpbill token list --agent ", "mcpbill keys retire "):
        assert bash_complete(line, env, capture) == [], line
    # chains need no home: the built-in ones are offered even beside a broken config.toml
    assert bash_complete("mcpbill wallet balance --chain sep", env, capture) == ["sepolia"]
    assert sorted(tmp_path.rglob("*")) == before


def test_chains_from_config_complete(tmp_path: Path, isolated_home: Path) -> None:
    isolated_home.mkdir()
    (isolated_home / "config.toml").write_text(
        '[chains.local]\ncaip2 = "eip155:31337"\n'
        'usdc = "0x5fbdb2315678afecb367f032d93f642f64180aa3"\n')
    env, capture = _env(tmp_path), tmp_path / "capture"
    assert bash_complete("mcpbill x402 fetch --chain lo", env, capture) == ["local"]
    assert sorted(bash_complete("mcpbill wallet sync --chain ", env, capture)) == [
        "base", "base-sepolia", "ethereum", "local", "sepolia"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_home_and_ledger_flags_select_the_values(ledger_cli: Invoke, db_url: str,
                                                 isolated_home: Path, tmp_path: Path) -> None:
    assert ledger_cli("wallet", "fund", "--tenant", "acme", "--demo", "1").exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    env = {**_env(tmp_path), "MCPBILL_HOME": str(elsewhere)}
    del env["MCPBILL_DB_URL"]
    capture = tmp_path / "capture"
    assert bash_complete("mcpbill wallet fund --tenant ", env, capture) == []
    flags = f"mcpbill --home {isolated_home} --db-url {db_url}"
    assert bash_complete(f"{flags} wallet fund --tenant ", env, capture) == ["acme"]
    assert bash_complete(f"{flags} pricing unset su", env, capture) == ["summarize"]
    assert not elsewhere.exists()


def test_fixed_values_complete(tmp_path: Path) -> None:
    env, capture = _env(tmp_path), tmp_path / "capture"
    assert bash_complete("mcpbill keys rotate --alg E", env, capture) == ["EdDSA", "ES256"]
    assert bash_complete("mcpbill init --alg H", env, capture) == ["HS256"]
    assert bash_complete("mcpbill token list --sort rem", env, capture) == ["remaining"]
    assert bash_complete("mcpbill token list --status ", env, capture) == [
        "active", "revoked", "expired"]
    assert bash_complete("mcpbill token list --output j", env, capture) == ["json"]
    assert bash_complete("mcpbill completion ", env, capture) == ["bash", "zsh", "fish"]


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_every_option_offered_is_an_option_whatever_its_description(
        shell: str, tmp_path: Path) -> None:
    """zsh and fish show each option's help beside it; a description longer than a line was
    wrapped, and each line after the first came back as a completion of its own."""
    env, runner = _env(tmp_path), SHELLS[shell]
    for command in ("token issue", "proxy", "reconcile", "webhooks add"):
        offered = runner(f"mcpbill {command} --", env, tmp_path / "capture")
        assert offered and all(re.fullmatch(r"--[a-z0-9-]+", word) for word in offered), (
            command, offered)
        assert "--json" in offered or command == "proxy", (command, offered)
