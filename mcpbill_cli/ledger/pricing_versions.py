"""The pricing table versions a ledger keeps (``pricing_versions``), read back.

A verifier records every table it charges with; a version number means one set of prices.
:func:`check_version` tells an operator, before a file goes live, whether its version already
names other prices in the ledger (a hand edit that forgot to bump ``version``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, func, select

from mcpbill_cli.clock import aware, rfc3339
from mcpbill_cli.errors import PricingVersionReused
from mcpbill_cli.ledger.models import pricing_versions as pv

if TYPE_CHECKING:
    from mcpbill_cli.pricing import PricingTable


def recorded_digest(conn: Connection, version: int) -> tuple[str, datetime] | None:
    """(digest, recorded_at in UTC) of the table recorded under ``version``, if any."""
    row = conn.execute(
        select(pv.c.digest, pv.c.recorded_at).where(pv.c.version == version)).first()
    return None if row is None else (str(row.digest), aware(row.recorded_at).astimezone(UTC))


def latest_version(conn: Connection) -> int | None:
    """The highest version recorded; ``None`` for a ledger that recorded none."""
    value = conn.execute(select(func.max(pv.c.version))).scalar()
    return None if value is None else int(value)


def check_version(conn: Connection, table: PricingTable, *, source: str) -> bool:
    """True when the ledger recorded exactly ``table``, False when its version is new.

    :class:`PricingVersionReused` when the ledger recorded other prices under the version.
    """
    recorded = recorded_digest(conn, table.version)
    if recorded is None:
        return False
    digest, recorded_at = recorded
    if digest == table.digest:
        return True
    bump = max(latest_version(conn) or 0, table.version) + 1
    raise PricingVersionReused(
        f"{source}: version {table.version} has other prices than the version "
        f"{table.version} the ledger charged with (recorded "
        f"{recorded_at:%Y-%m-%d %H:%M:%S} UTC); bump `version` to {bump}",
        path=source, pricingVersion=table.version, nextVersion=bump,
        recordedAt=rfc3339(recorded_at))
