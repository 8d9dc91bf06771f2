"""Sealing everything that is waiting: for ``mcpbill audit seal``, ``db upgrade`` and a
verifier's background writer alike."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine

from mcpbill_cli.ledger.engine import writing
from mcpbill_cli.ledger.seals import Seal, SealRace, Sign, seal_pending


def seal_all(engine: Engine, sign: Sign, *, clock: Callable[[], datetime]) -> list[Seal]:
    """Seal every committed, unsealed event, one transaction per seal; the seals written.
    Stops when nothing is left or another sealer has the turn (it seals the rest)."""
    made: list[Seal] = []
    while True:
        try:
            with writing(engine) as conn:
                seal = seal_pending(conn, sign, now=clock())
        except SealRace:
            return made
        if seal is None:
            return made
        made.append(seal)
