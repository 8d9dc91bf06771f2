"""SQLite hashes the sealed batches in Python, on the raw driver, one seal at a time.

SQLite has no SHA-256, so every event's canonical form is read into Python and hashed there;
what costs is everything else per row. SQLite writes the form itself (``json_object``, in C:
writing it key by key in Python cost more than reading the fields) and the form is
:func:`audit.chain_hash`'s when ``at`` is in the stored text form ``YYYY-MM-DD
HH:MM:SS.ffffff`` (UTC, made ``...THH:MM:SS.ffffff+00:00``), ``demo`` 0 or 1, ``amount`` an
integer. Both escape ``"``, ``\\`` and control characters alike; ``json.dumps`` also escapes DEL
and everything beyond ASCII, which SQLite writes as it is, so forms holding such a byte are
not vouched for. The bytes and the times are checked per seal, over all its events at once
(checked per event in SQL they cost as much as writing the forms). A seal whose events all
read that way, count and span and batch hash and stored hashes as sealed, is vouched for;
any other is re-checked by ``seals.verify_batch`` through SQLAlchemy, which names the
events: the answer is that one.

Each seal's money (``ledger.seal_money``): the transfers its events name
(:func:`seal_money.named_transfer`, written in SQL below and read with the events), among those
created within its events' span (widened by ``SLACK``), per class of account. The span's
transfers are read in time order (``ix_transfers_created``) and matched here to the ids named,
each counted as often as it is named. Joining each event to its transfer in SQL looked every
id up in the primary key's index, a page at random per event: 3.2 s of CPU over a day of a
million events, against 2.4 s for reading the span and matching it here. The matched transfers
are grouped by their two accounts and each account classed once per seal, in Python: classing
both accounts of every transfer of the span in SQL (``CASE ... GLOB``) cost 1.7% more
instructions for the batches (callgrind over 8 seals of a 100k-call day: 2.62 G against
2.58 G).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta
from operator import methodcaller
from typing import Any

from sqlalchemy import Connection

from mcpbill_cli.ledger import seal_money
from mcpbill_cli.ledger.audit import CHAIN_FIELDS
from mcpbill_cli.ledger.seal_money import Money
from mcpbill_cli.ledger.seals import Seal, batch_hash

_STORED = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy's DateTime keeps a time in SQLite
_STORED_AT = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}"
_STORED_ATS = re.compile(f"(?:{_STORED_AT}\n)*{_STORED_AT}", re.ASCII)  # a seal's, one a line
_ONE_AT = re.compile(_STORED_AT, re.ASCII)
_WRITABLE = "demo IN (0, 1) AND typeof(amount) IN ('integer', 'null')"
_MEMBERS = {"seq": "id", "at": "substr(at, 1, 10) || 'T' || substr(at, 12) || '+00:00'",
            "demo": "json(iif(demo, 'true', 'false'))"}
_FORM = "json_object({})".format(", ".join(f"'{name}', {_MEMBERS.get(name, name)}"
                                           for name in sorted(CHAIN_FIELDS)))
_NAMED = ("CASE WHEN e.kind IN ('hold', 'capture', 'charge', 'void', 'expire', 'refund') "
          "THEN e.kind || ':' || ifnull(e.ref, '') "
          "WHEN e.kind = 'issue' THEN iif(ifnull(e.ref, '') = '', 'allot:', 'child:') "
          "|| ifnull(e.jti, '') "
          "WHEN e.kind = 'deposit' THEN iif(e.ref GLOB 'deposit:*', e.ref, 'deposit:' || e.ref) "
          "WHEN e.kind IN ('topup', 'release') THEN e.ref END")
_EVENTS = (f"SELECT id, hash, CAST(iif({_WRITABLE}, {_FORM}, NULL) AS BLOB), at, "  # noqa: S608
           f"{_NAMED} FROM events AS e WHERE seal = ? ORDER BY id")
_UNWRITTEN = (f"SELECT id, hash, NULL, at, {_NAMED} FROM events AS e "  # noqa: S608
              "WHERE seal = ? ORDER BY id")


_SPAN = (f"SELECT t.id, t.kind IN {seal_money.POSTED_KINDS}, "  # noqa: S608
         "t.credit_account_id, t.debit_account_id, t.amount FROM transfers AS t")
_hex = methodcaller("hexdigest")


def unvouched(conn: Connection, seals: Iterable[Seal]) -> tuple[list[Seal], dict[int, Money]]:
    """The seals among ``seals`` whose events this pass could not show to match (re-check
    those with ``verify_batch``), and each seal's money now. One seal's events are held at a
    time."""
    suspects, money = [], {}
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        for seal in seals:
            try:
                rows = cursor.execute(_EVENTS, (seal.number,)).fetchall()
            except sqlite3.OperationalError:  # a BLOB in a text field: no form, no sealer's
                rows = cursor.execute(_UNWRITTEN, (seal.number,)).fetchall()
            columns = tuple(zip(*rows, strict=True)) or ((), (), (), (), ())
            times = _times(columns[3])
            if not _clean(seal, columns, times):
                suspects.append(seal)
            if times:
                money[seal.number] = _money(cursor, columns[4], min(times), max(times))
    finally:
        cursor.close()
    return suspects, money


def _times(stored: tuple[Any, ...]) -> tuple[str, ...]:
    """The events' ``at`` in the stored form (all of them, as a clean seal's are)."""
    if all(type(at) is str for at in stored) and _STORED_ATS.fullmatch("\n".join(stored)):
        return stored
    return tuple(at for at in stored if type(at) is str and _ONE_AT.fullmatch(at))


def _clean(seal: Seal, columns: tuple[tuple[Any, ...], ...], times: tuple[str, ...]) -> bool:
    """The seal's events, read as columns, are what it sealed (each form certain, see above)."""
    ids, stored, forms, _, _ = columns
    if len(ids) != seal.count or not ids or (ids[0], ids[-1]) != (seal.first_id, seal.last_id):
        return False
    if None in forms or len(times) != len(ids):
        return False
    written = b"".join(forms)
    if not written.isascii() or b"\x7f" in written:
        return False
    digests = list(map(_hex, map(hashlib.sha256, forms)))
    return digests == list(stored) and batch_hash(digests) == seal.batch_hash


def _money(cursor: Any, named: Iterable[Any], first: str, last: str) -> Money:
    """The transfers the seal's events name (``named``: one id, or None, per event), those
    created within its events' span, each as often as named, per class of account. (As
    SQLite compares them: a BLOB id equals a BLOB only, never a text.)"""
    times = Counter(name for name in named if name is not None)
    groups: dict[tuple[Any, Any, Any], list[int]] = {}
    for transfer, is_posted, credited, debited, amount in _span(cursor, first, last):
        named_times = times.get(transfer)
        if named_times:
            group = groups.setdefault((is_posted, credited, debited), [0, 0])
            group[0] += named_times
            group[1] += int(named_times * amount)  # as fold took each row's
    classes: dict[Any, str] = {}
    return seal_money.fold(
        (is_posted, _class(credited, classes), _class(debited, classes), count, moved)
        for (is_posted, credited, debited), (count, moved) in groups.items())


def _class(account: Any, classes: dict[Any, str]) -> str:
    """:func:`seal_money.account_class` of an account id as SQLite handed it back, once per
    id (a BLOB id is no class's: SQLite's GLOB and ``=`` never matched one to a name)."""
    if account not in classes:
        classes[account] = (seal_money.account_class(account) if isinstance(account, str)
                            else "other")
    return classes[account]


def _span(cursor: Any, first: str, last: str) -> Any:
    """The transfers created from ``SLACK`` before ``first`` to ``SLACK`` after ``last`` (as
    stored; unbounded on a side beyond the ends of time)."""
    bounds = [(">=", _moved(first, -seal_money.SLACK)), ("<=", _moved(last, seal_money.SLACK))]
    kept = [(op, at) for op, at in bounds if at is not None]
    where = " AND ".join(f"t.created_at {op} ?" for op, _ in kept)
    return cursor.execute(f"{_SPAN} WHERE {where}" if where else _SPAN,
                          tuple(at for _, at in kept))


def _moved(at: str, by: timedelta) -> str | None:
    """``at`` (as stored) moved ``by``, as stored; None beyond the ends of time (unbounded)."""
    try:
        return (datetime.strptime(at, _STORED) + by).strftime(_STORED)  # noqa: DTZ007 - UTC
    except OverflowError:
        return None
