"""`mcpbill audit seal | seals export`: the trail sealed on demand, and its seals kept outside
the database, each verifiable offline with `mcpbill keys export-jwks`."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from sqlalchemy import Engine, func, select, text

from mcpbill_cli import Verifier
from mcpbill_cli.keys import VerificationKey, keys_from_jwks
from mcpbill_cli.ledger.audit import GENESIS
from mcpbill_cli.ledger.engine import make_engine, reading
from mcpbill_cli.ledger.models import events
from mcpbill_cli.ledger.seals import SEAL_TYPE
from tests.cli.conftest import Invoke, error_json, ok_json

SEAL_FIELDS = {"seal", "first_id", "last_id", "count", "batch_hash", "prev_hash", "sealed_at",
               "hash", "kid", "jws", "money"}
# The JWS payload's wire names for the fields a seal prints in snake_case.
SIGNED_NAMES = {"seal": "seal", "firstId": "first_id", "lastId": "last_id", "count": "count",
                "batchHash": "batch_hash", "prevHash": "prev_hash", "hash": "hash",
                "money": "money"}


@pytest.fixture
def ledger(ledger_cli: Invoke) -> Iterator[Engine]:
    """The CLI's ledger, for reading what the commands wrote."""
    engine = make_engine(os.environ["MCPBILL_DB_URL"])
    yield engine
    engine.dispose()


def unsealed(engine: Engine) -> int:
    with reading(engine) as conn:
        return int(conn.execute(select(func.count()).where(events.c.seal.is_(None)))
                   .scalar_one())


def activity(cli: Invoke, engine: Engine, n: int) -> None:
    """A deposit, a token, and a paid call by a verifier that leaves sealing to its owner."""
    ok_json(cli("wallet", "fund", "--demo", "1", "--json"))
    token = ok_json(cli("token", "issue", "--limit", "0.5", "--json"))["token"]
    verifier = Verifier.from_settings(engine=engine)
    verifier.charge(token, "search", args={"n": n})


def jwks_keys(cli: Invoke, *options: str) -> dict[str, VerificationKey]:
    result = cli("keys", "export-jwks", *options)
    assert result.exit_code == 0, result.output
    return keys_from_jwks(json.loads(result.stdout))


def assert_verifies(line: dict[str, Any], keys: dict[str, VerificationKey]) -> None:
    """As a third party checks an exported seal: its JWS with the JWKS, its hash as
    documented (sha256 of the canonical JSON of the other signed fields)."""
    header = jwt.get_unverified_header(line["jws"])
    assert (header["kid"], header["typ"]) == (line["kid"], SEAL_TYPE)
    assert line["kid"] in keys, f"seal {line['seal']}: key {line['kid']} is not in the JWKS"
    key = keys[line["kid"]]
    claims = jwt.decode(line["jws"], key.key, algorithms=[key.alg])
    assert set(claims) == {*SIGNED_NAMES, "sealedAt", "money"}
    assert {SIGNED_NAMES[k]: v for k, v in claims.items() if k not in ("sealedAt", "money")} == {
        k: v for k, v in line.items()
        if k not in ("kid", "jws", "sealed_at", "schema_version", "money")}
    money = line["money"]  # in micro-USDC, named so; signed under the wire names
    assert claims["money"] == {"transfers": money["transfers"], "amount": money["amount_micro"],
                               "posted": money["posted_micro"], "pending": money["pending_micro"]}
    assert sum(money["posted_micro"].values()) == sum(money["pending_micro"].values()) == 0
    assert datetime.fromisoformat(claims["sealedAt"]) == datetime.fromisoformat(line["sealed_at"])
    hashed = {k: v for k, v in claims.items() if k != "hash"}
    canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"))
    assert hashlib.sha256(canonical.encode()).hexdigest() == claims["hash"]


def export_lines(result: Any) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def exported(seals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seals as `audit seal --json` prints them, as `seals export` writes them (version 2)."""
    return [{"schema_version": 2, **seal} for seal in seals]


# --- audit seal -------------------------------------------------------------------------------


def test_audit_seal_seals_what_is_pending_as_one_document(ledger_cli: Invoke,
                                                          ledger: Engine) -> None:
    cli = ledger_cli
    activity(cli, ledger, 1)
    pending = unsealed(ledger)
    assert pending >= 3  # deposit, issue, charge

    data = ok_json(cli("audit", "seal", "--json"))

    assert data["events"] == pending and len(data["seals"]) == 1
    [seal] = data["seals"]
    assert set(seal) == SEAL_FIELDS
    assert (seal["seal"], seal["count"], seal["prev_hash"]) == (1, pending, GENESIS)
    assert unsealed(ledger) == 0
    assert_verifies(seal, jwks_keys(cli))
    assert ok_json(cli("audit", "seal", "--json")) == {"seals": [], "events": 0}


def test_audit_seal_talks_on_stderr_and_prints_no_data(ledger_cli: Invoke,
                                                       ledger: Engine) -> None:
    activity(ledger_cli, ledger, 1)
    pending = unsealed(ledger)
    sealed = ledger_cli("audit", "seal")
    assert sealed.exit_code == 0, sealed.output
    assert (sealed.stdout, sealed.stderr.strip()) == (
        "", f"sealed {pending} event(s) in 1 seal(s)")
    again = ledger_cli("audit", "seal")
    assert (again.exit_code, again.stdout, again.stderr.strip()) == (0, "", "nothing to seal")


def test_audit_seal_without_keys_says_how_to_get_them(ledger_cli: Invoke, ledger: Engine,
                                                      isolated_home: Path) -> None:
    activity(ledger_cli, ledger, 1)
    for path in sorted((isolated_home / "keys").iterdir()):
        path.unlink()
    result = ledger_cli("audit", "seal", "--json")
    assert "mcpbill init" in error_json(result, "NOT_INITIALIZED")["message"]
    assert unsealed(ledger) > 0


# --- audit seals export ------------------------------------------------------------------------


@pytest.fixture
def three_seals(ledger_cli: Invoke, ledger: Engine) -> list[dict[str, Any]]:
    made = []
    for n in range(3):
        activity(ledger_cli, ledger, n)
        made += ok_json(ledger_cli("audit", "seal", "--json"))["seals"]
    assert [seal["seal"] for seal in made] == [1, 2, 3]
    return made


def test_seals_export_writes_one_json_line_per_seal(ledger_cli: Invoke,
                                                    three_seals: list[dict[str, Any]]) -> None:
    lines = export_lines(ledger_cli("audit", "seals", "export"))
    assert lines == exported(three_seals)
    assert [line["prev_hash"] for line in lines] == [GENESIS, lines[0]["hash"], lines[1]["hash"]]
    keys = jwks_keys(ledger_cli)
    for line in lines:
        assert_verifies(line, keys)


def test_seals_export_after_n_writes_only_later_seals(ledger_cli: Invoke,
                                                      three_seals: list[dict[str, Any]]
                                                      ) -> None:
    assert export_lines(ledger_cli("audit", "seals", "export", "--after", "2")) == exported(
        three_seals[2:])
    assert export_lines(ledger_cli("audit", "seals", "export", "--after", "3")) == []
    assert export_lines(ledger_cli("audit", "seals", "export", "--after", "0")) == exported(
        three_seals)


def test_seals_export_out_writes_the_file(ledger_cli: Invoke, three_seals: list[dict[str, Any]],
                                          tmp_path: Path) -> None:
    out = tmp_path / "seals.jsonl"
    result = ledger_cli("audit", "seals", "export", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert " ".join(result.stderr.split()) == f"wrote 3 seal(s) to {out}"  # Rich wraps at 80
    assert out.read_text() == ledger_cli("audit", "seals", "export").stdout
    assert [json.loads(line) for line in out.read_text().splitlines()] == exported(three_seals)


def test_seals_export_json_needs_out_and_prints_a_summary(
        ledger_cli: Invoke, three_seals: list[dict[str, Any]], tmp_path: Path) -> None:
    out = tmp_path / "later.jsonl"
    data = ok_json(ledger_cli("audit", "seals", "export", "--after", "1", "--out", str(out),
                              "--json"))
    assert data == {"seals": 2, "first": 2, "last": 3, "out": str(out), "kept": 0}
    assert [json.loads(line) for line in out.read_text().splitlines()] == exported(
        three_seals[1:])
    none = ok_json(ledger_cli("audit", "seals", "export", "--after", "3", "--out", str(out),
                              "--json"))
    assert none == {"seals": 0, "first": None, "last": None, "out": str(out), "kept": 2}
    assert [json.loads(line) for line in out.read_text().splitlines()] == exported(
        three_seals[1:])
    refused = ledger_cli("audit", "seals", "export", "--json")
    assert "--out" in error_json(refused, "INVALID_INPUT")["message"]


def test_seals_made_before_a_key_rotation_verify_with_both_keys_exported(
        ledger_cli: Invoke, ledger: Engine) -> None:
    """A token still live keeps the old key in the JWKS: both seals verify."""
    activity(ledger_cli, ledger, 1)
    first = ok_json(ledger_cli("audit", "seal", "--json"))["seals"][0]
    rotated = ok_json(ledger_cli("keys", "rotate", "--json"))
    activity(ledger_cli, ledger, 2)
    second = ok_json(ledger_cli("audit", "seal", "--json"))["seals"][0]
    assert (first["kid"], second["kid"]) == (rotated["previous"]["kid"],
                                             rotated["active"]["kid"])
    keys = jwks_keys(ledger_cli)
    for line in export_lines(ledger_cli("audit", "seals", "export")):
        assert_verifies(line, keys)


def test_a_seal_signed_by_a_key_rotated_out_still_verifies(ledger_cli: Invoke,
                                                           ledger: Engine) -> None:
    """A rotated key leaves the tokens' JWKS once its last token expires (at once here: it
    signed none); `export-jwks --all` keeps every key, for receipts and seals."""
    ok_json(ledger_cli("wallet", "fund", "--demo", "1", "--json"))  # an event, no token
    [seal] = ok_json(ledger_cli("audit", "seal", "--json"))["seals"]
    ok_json(ledger_cli("keys", "rotate", "--json"))
    assert seal["kid"] not in jwks_keys(ledger_cli)
    assert_verifies(seal, jwks_keys(ledger_cli, "--all"))
    retired = ledger_cli("keys", "retire", seal["kid"], "--force", "--json")
    assert retired.exit_code == 0, retired.output
    assert_verifies(seal, jwks_keys(ledger_cli, "--all"))


# --- help --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, lists", [
    ((), ["audit"]), (("audit",), ["seal", "seals"]), (("audit", "seals"), ["export"]),
    (("audit", "seal"), ["--json"]), (("audit", "seals", "export"), ["--after", "--out"]),
])
def test_audit_commands_have_help(cli: Invoke, path: tuple[str, ...], lists: list[str]) -> None:
    result = cli(*path, "--help")
    assert result.exit_code == 0, result.output
    for word in lists:
        assert word in result.stdout, (path, word)
    summary = result.stdout.split("Usage:")[1].split("╭")[0].strip()
    assert len(summary.splitlines()) >= 2, f"{' '.join(path)} has no help text"


def test_seals_export_continues_its_file_and_refuses_a_rewritten_trail(
        ledger_cli: Invoke, ledger: Engine, three_seals: list[dict[str, Any]],
        tmp_path: Path) -> None:
    """Run from cron on one file: each run adds the seals made since. A trail rewritten in the
    database since (its events un-stamped and sealed again: the chain is the operator's own,
    signed with its key) no longer matches the file: refused, the file kept as it was."""
    out = tmp_path / "seals.jsonl"
    ok_json(ledger_cli("audit", "seals", "export", "--after", "1", "--out", str(out), "--json"))
    activity(ledger_cli, ledger, 3)
    fourth = ok_json(ledger_cli("audit", "seal", "--json"))["seals"]
    data = ok_json(ledger_cli("audit", "seals", "export", "--out", str(out), "--json"))
    assert data == {"seals": 1, "first": 4, "last": 4, "out": str(out), "kept": 2}
    assert [json.loads(line) for line in out.read_text().splitlines()] == exported(
        three_seals[1:] + fourth)
    wrong_after = ledger_cli("audit", "seals", "export", "--after", "2", "--out", str(out),
                             "--json")
    assert "--after 4" in error_json(wrong_after, "INVALID_INPUT")["message"]

    kept = out.read_bytes()
    with ledger.begin() as conn:  # rewrite history, then let the sealer seal it again
        conn.execute(text("UPDATE events SET seal = NULL, hash = NULL"))
        conn.execute(text("DELETE FROM seals"))
    assert ok_json(ledger_cli("audit", "seal", "--json"))["events"] > 0
    refused = ledger_cli("audit", "seals", "export", "--out", str(out), "--json")
    assert refused.exit_code == 9
    assert "rewritten" in error_json(refused, "AUDIT_CHAIN_BROKEN")["message"]
    assert out.read_bytes() == kept


@pytest.mark.parametrize("content", [b"not json\n", b'{"seal": 1}\n', b'{"seal": 1, "hash'])
def test_seals_export_refuses_to_continue_a_file_it_did_not_write(
        ledger_cli: Invoke, three_seals: list[dict[str, Any]], tmp_path: Path,
        content: bytes) -> None:
    out = tmp_path / "notes.txt"
    out.write_bytes(content)
    refused = ledger_cli("audit", "seals", "export", "--out", str(out), "--json")
    assert "nothing was written" in error_json(refused, "INVALID_INPUT")["message"]
    assert out.read_bytes() == content
