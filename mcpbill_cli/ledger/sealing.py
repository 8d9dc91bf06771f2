"""Sealing everything that is waiting: for ``mcpbill audit seal``, ``db upgrade`` and a
verifier's background writer alike."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine

from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.seals import BATCH_LIMIT, Seal, SealRace, Sign, take_pending, write_seal


def seal_all(engine: Engine, sign: Sign, *, clock: Callable[[], datetime],
             wait: bool = False) -> list[Seal]:
    """Seal every committed, unsealed event, one batch at a time: read and hash it, then seal
    it in a short write transaction. Returns the seals written; stops after a batch that was
    not full, when nothing is left, or when another sealer has the turn (it seals the rest)
    unless ``wait``.

    A batch short of the limit held everything that was waiting: what committed since is the
    next turn's. Going on would seal the few events paid calls commit meanwhile, a seal at a
    time, for as long as calls keep coming (measured: a seal per 5 events, 500 us of the
    sealer's CPU per paid call, where one seal per turn costs under 40).
    """
    made: list[Seal] = []
    while True:
        with reading(engine) as conn:
            pending = take_pending(conn)
        if pending is None:
            return made
        try:
            with writing(engine) as conn:
                seal = write_seal(conn, pending, sign, now=clock(), wait=wait)
        except SealRace:
            if wait:
                continue  # another sealer took some of them: read what is left
            return made
        if seal is None:
            return made
        made.append(seal)
        if seal.count < BATCH_LIMIT:
            return made
