"""SQLite writing the sealed events' canonical forms for Python to hash (``seal_py``) finds
exactly what Python's ``seals.verify_batch`` finds, on events whose text JSON escapes, whose
times are odd, on tampered batches, and on batches forged over a form SQLite writes and
``json.dumps`` does not; a clean batch of plain events is vouched for."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text, update

from mcpbill_cli.ledger import audit
from mcpbill_cli.ledger.engine import make_engine, reading
from mcpbill_cli.ledger.models import events, seals
from mcpbill_cli.ledger.schema import upgrade
from mcpbill_cli.ledger.seals import batch_hash, read_seals
from mcpbill_cli.reconcile import seal_py
from tests.reconcile.test_seal_sql import compare, odd_events, plain, write_sealed


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[Engine]:
    """seal_py is SQLite's."""
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


def unvouched(engine: Engine) -> list[int]:
    with reading(engine) as conn:
        suspects, _ = seal_py.unvouched(conn, list(read_seals(conn)))
    return [seal.number for seal in suspects]


def test_odd_events_verify_in_sqlite_as_in_python(sqlite: Engine) -> None:
    write_sealed(sqlite, odd_events())
    assert compare(sqlite) == []
    # 1, 2 and 4 hold DEL or text beyond ASCII: Python decides. 3 and 5 hold quotes,
    # backslashes and control characters, which SQLite escapes as json.dumps does.
    assert unvouched(sqlite) == [1, 2, 4]


def test_a_clean_batch_of_plain_events_is_vouched_for(sqlite: Engine) -> None:
    write_sealed(sqlite, plain(odd_events()))
    assert unvouched(sqlite) == []
    assert compare(sqlite) == []


TAMPERING = [
    "UPDATE events SET amount = 1 WHERE id = 3",
    "UPDATE events SET amount = 1.5 WHERE id = 3",
    "UPDATE events SET tenant = 'caf\u00e9' WHERE id = 4",
    "UPDATE events SET at = '2031-03-14 12:00:00.5' WHERE id = 5",
    "UPDATE events SET demo = NOT demo WHERE id = 6",
    "UPDATE events SET demo = 2 WHERE id = 6",
    "DELETE FROM events WHERE id IN (8, 9)",
    "UPDATE events SET hash = (SELECT hash FROM events WHERE id = 2) WHERE id = 12",
    "UPDATE events SET seal = 1 WHERE id = 13",
    "UPDATE events SET id = 40 WHERE id = 26",
]


@pytest.mark.parametrize("tampering", TAMPERING)
@pytest.mark.parametrize("rows", [odd_events, lambda: plain(odd_events())])
def test_tampering_is_found_alike(sqlite: Engine, tampering: str, rows: Any) -> None:
    write_sealed(sqlite, rows())
    with sqlite.begin() as conn:
        conn.execute(text(tampering))
    assert compare(sqlite)


def sqlite_style_digest(event: dict[str, Any], escaped: str, written: str) -> str:
    """A forger's hash: the canonical form as ``json.dumps`` writes it, ``escaped`` as
    ``written`` (what SQLite's ``json_object`` writes for it)."""
    fields = {name: event.get(name) for name in audit.CHAIN_FIELDS}
    fields["seq"], fields["at"] = event["id"], audit.utc_text(event["at"])
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.replace(escaped, written).encode()).hexdigest()


def forge(engine: Engine, changes: dict[str, Any], escaped: str, written: str) -> None:
    """Edit event 1 of a sealed batch of two and re-hash the batch as SQLite writes it."""
    with engine.begin() as conn:
        conn.execute(update(events).where(events.c.id == 1).values(**changes))
        rows = conn.execute(select(events).order_by(events.c.id)).mappings().all()
        digests = [sqlite_style_digest(dict(row), escaped, written) for row in rows]
        for row, digest in zip(rows, digests, strict=True):
            conn.execute(update(events).where(events.c.id == row["id"]).values(hash=digest))
        conn.execute(update(seals).values(batch_hash=batch_hash(digests)))


@pytest.mark.parametrize(("changes", "escaped", "written"), [
    ({"tenant": "caf\u00e9"}, "\\u00e9", "\u00e9"),
    ({"detail": "del\x7f"}, "\\u007f", "\x7f"),
    ({"amount": 10**20 * 1.0}, "1e+20", "1.0e+20"),
])
def test_a_batch_forged_over_what_sqlite_writes_is_not_vouched_for(
        sqlite: Engine, changes: dict[str, Any], escaped: str, written: str) -> None:
    """SQLite writes text beyond ASCII and DEL as they are, and its own form of a real: a
    batch re-hashed that way is left to Python, which finds it."""
    write_sealed(sqlite, plain(odd_events())[:2])
    forge(sqlite, changes, escaped, written)
    assert unvouched(sqlite) == [1]
    assert compare(sqlite)[0] == ("events", "1", "changed after seal 1 took it")
