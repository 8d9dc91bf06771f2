"""PostgreSQL re-hashes the audit chain itself: ``audit.event_hash`` written in SQL.

The canonical JSON is built in SQL exactly as ``json.dumps`` writes it, for the events where
that is certain: every text field printable ASCII (where ``json.dumps`` escapes only ``"``
and ``\\``) and ``at`` within years 1000..9999. PostgreSQL computes the sha256 and compares
it, and each event's link to the one before (``lag``), and returns only the events that do
not verify or that it could not decide (any other text); Python checks those with
``audit.event_hash``, so the answer is the Python one, row for row. A clean day's events
never leave the server.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection

from mcpbill_cli.ledger import audit

BATCH = 5000
TEXT_FIELDS = ("kind", "code", "jti", "token_hash", "tenant", "agent", "tool", "ref", "detail")
_AT = "to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US')"


def _json_value(field: str) -> str:
    """SQL for ``field`` as ``json.dumps`` writes it (text fields: when printable ASCII)."""
    if field in TEXT_FIELDS:
        return (f"coalesce('\"' || replace(replace({field}, '\\', '\\\\'), '\"', '\\\"') "
                "|| '\"', 'null')")
    if field == "at":
        return f"'\"' || {_AT} || '+00:00\"'"
    if field == "demo":
        return "CASE WHEN demo THEN 'true' ELSE 'false' END"
    return f"coalesce({field}::text, 'null')"  # seq, amount: bigint, as Python's int


def _canonical() -> str:
    members = [f"'\"{field}\":' || {_json_value(field)}" for field in sorted(audit.CHAIN_FIELDS)]
    return "'{' || " + " || ',' || ".join(members) + " || '}'"


# What PostgreSQL can vouch for: printable ASCII throughout, a four-digit year.
_DECIDABLE = ("canonical ~ '^[ -~]*$' AND at >= '1000-01-01 00:00:00+00' "
              "AND at < '10000-01-01 00:00:00+00'")
_FIELDS = ", ".join((*audit.CHAIN_FIELDS, "prev_hash", "hash"))
_SUSPECTS = f"""
SELECT {_FIELDS}, before_seq, before_hash, verified FROM (
  SELECT {_FIELDS},
         lag(seq) OVER by_seq AS before_seq, lag(hash) OVER by_seq AS before_hash,
         CASE WHEN {_DECIDABLE}
              THEN encode(sha256(convert_to(prev_hash || canonical, 'UTF8')), 'hex') = hash
         END AS verified
  FROM (SELECT {_FIELDS}, {_canonical()} AS canonical FROM events
        WHERE seq >= %(first)s AND seq <= %(last)s ORDER BY seq OFFSET 0) AS chained
  WINDOW by_seq AS (ORDER BY seq)
) AS checked
WHERE before_seq IS NULL OR seq <> before_seq + 1 OR prev_hash <> before_hash
      OR verified IS NOT TRUE
ORDER BY seq
"""  # noqa: S608 - constants only


def verify_segment(conn: Connection, first: int, last: int,
                   expected: tuple[int, str]) -> Iterator[audit.ChainBreak]:
    """What ``audit.verify_events(conn, first, last, expected)`` yields, worked out by
    PostgreSQL but for the events it returns."""
    for *event, prev_hash, digest, before_seq, before_hash, verified in _suspects(conn, first,
                                                                                  last):
        seq = event[0]
        expected_seq, expected_prev = ((before_seq + 1, before_hash) if before_seq is not None
                                       else expected)
        if seq != expected_seq:
            yield audit.ChainBreak(expected_seq, f"events {expected_seq}..{seq - 1} are missing")
        if prev_hash != expected_prev:
            yield audit.ChainBreak(seq, "prev_hash does not match the event before")
        # Undecided, or a mismatch: the definition has the last word.
        if not verified and audit.chain_hash(prev_hash, seq, audit.utc_text(event[1]),
                                             *event[2:]) != digest:
            yield audit.ChainBreak(seq, "the event was changed after it was written")


def _suspects(conn: Connection, first: int, last: int) -> Iterator[Any]:
    """The events PostgreSQL did not verify, and the first (linked to the one before it),
    from a server-side cursor: a broken chain may return many."""
    driver: Any = conn.connection.driver_connection
    # In parallel workers the events would be sorted again for lag(); read them in order.
    driver.execute("SET LOCAL max_parallel_workers_per_gather = 0")
    with driver.cursor("mcpbill_chain_suspects") as cursor:
        cursor.execute(_SUSPECTS, {"first": first, "last": last})
        while rows := cursor.fetchmany(BATCH):
            yield from rows
    driver.execute("SET LOCAL max_parallel_workers_per_gather TO DEFAULT")
