"""A billed call cancelled with a plain ``task.cancel()``, which no anyio shield holds back,
while its ledger work runs on a worker thread: the hold it took is voided, once."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import CodeType, FrameType
from typing import Any, cast

import anyio
import pytest
from mcp.client import Client
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import RequestParamsMeta
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select

from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import calls, events
from mcpbill_cli.mcp import IDEMPOTENCY_KEY_META, REPLAYED_META, TOKEN_META, Billing
from mcpbill_cli.mcp.billing import _Run
from mcpbill_cli.verifier import Verifier

from .conftest import Mint, receipt_of, token_view, usd

PRICE = usd("0.002")


@contextmanager
def ledger_locked(engine: Engine) -> Iterator[None]:
    """Every write to the ledger waits until the block ends; reads go on."""
    with writing(engine) as conn:
        if engine.dialect.name == "postgresql":  # SQLite's BEGIN IMMEDIATE is the lock there
            conn.exec_driver_sql("LOCK TABLE calls IN EXCLUSIVE MODE")
        yield


def runs(code: CodeType) -> bool:
    """Whether some thread is running ``code`` (anywhere in its stack)."""
    def frames(frame: FrameType | None) -> Iterator[FrameType]:
        while frame is not None:
            yield frame
            frame = frame.f_back
    return any(frame.f_code is code for top in sys._current_frames().values()  # noqa: SLF001
               for frame in frames(top))


def billed_server(billing: Billing, tasks: list[asyncio.Task[Any]],
                  gate: tuple[asyncio.Event, asyncio.Event] | None = None,
                  sync: bool = False) -> MCPServer:
    """A server with a billed ``search``, async (which, given a ``gate``, sets its first event
    and waits for its second) unless ``sync``, whose calls each run in a task of their own,
    kept in ``tasks`` for the test to cancel."""
    server: MCPServer = MCPServer("cancellable", extensions=[billing])

    async def search(q: str) -> str:
        if gate is not None:
            gate[0].set()
            await gate[1].wait()
        return q

    def search_sync(q: str) -> str:
        return q

    billing.tool(server, "search")(search_sync if sync else search)

    async def in_a_task(ctx: ServerRequestContext[Any, Any],
                        call_next: CallNext) -> HandlerResult:
        if ctx.method != "tools/call":
            return await call_next(ctx)
        task = asyncio.ensure_future(call_next(ctx))
        tasks.append(task)
        await asyncio.wait([task])
        if task.cancelled():  # the SDK answers an internal error
            raise RuntimeError("the call was cancelled")
        return task.result()

    server.middleware.append(in_a_task)
    return server


def samples(billing: Billing) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert billing.metrics is not None
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(billing.metrics.text())
            for sample in family.samples}


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_a_call_cancelled_while_it_opens_voids_its_hold_once(
        verifier: Verifier, engine: Engine, mint: Mint, sync: bool) -> None:
    token = mint(limit="0.05")
    billing = Billing(verifier, metrics=True)
    tasks: list[asyncio.Task[Any]] = []
    server = billed_server(billing, tasks, sync=sync)
    meta = cast(RequestParamsMeta, {TOKEN_META: token.token})

    async def scenario() -> Any:
        async with Client(server) as client:
            async def cancelled() -> None:
                with pytest.raises(MCPError):  # no answer: an internal error
                    await client.call_tool("search", {"q": "a"}, meta=meta)

            async with anyio.create_task_group() as group:
                with ledger_locked(engine):
                    group.start_soon(cancelled)
                    while not runs(_Run.open.__code__):  # its hold waits for the ledger
                        await anyio.sleep(0.01)
                    tasks[0].cancel()
                    while not tasks[0].done():
                        await anyio.sleep(0.01)
            while runs(_Run.open.__code__):  # the hold is taken, then given up
                await anyio.sleep(0.01)
            return await client.call_tool("search", {"q": "b"}, meta=meta)

    later = anyio.run(scenario)
    assert receipt_of(later)["amount"] == str(PRICE)
    view = token_view(engine, token)
    assert (view.spent, view.held, view.remaining) == (PRICE, 0, usd("0.05") - PRICE)
    with reading(engine) as conn:
        statuses = sorted(conn.execute(select(calls.c.status)).scalars())
        voids = conn.execute(select(func.count()).where(events.c.kind == "void")).scalar()
    assert statuses == ["captured", "voided"] and voids == 1
    got = samples(billing)
    assert got[("mcpbill_calls_total", (("outcome", "voided"), ("tool", "search")))] == 1
    assert got[("mcpbill_calls_total", (("outcome", "captured"), ("tool", "search")))] == 1
    assert got[("mcpbill_holds_open", ())] == 0


def test_a_call_cancelled_while_it_captures_stays_captured(
        verifier: Verifier, engine: Engine, mint: Mint) -> None:
    token = mint(limit="0.05")
    billing = Billing(verifier, metrics=True)
    tasks: list[asyncio.Task[Any]] = []
    started, go = asyncio.Event(), asyncio.Event()
    server = billed_server(billing, tasks, (started, go))
    key = cast(RequestParamsMeta, {TOKEN_META: token.token, IDEMPOTENCY_KEY_META: "order-1"})

    async def scenario() -> Any:
        async with Client(server) as client:
            async def cancelled() -> None:
                with pytest.raises(MCPError):  # no answer: an internal error
                    await client.call_tool("search", {"q": "a"}, meta=key)

            async with anyio.create_task_group() as group:
                group.start_soon(cancelled)
                await started.wait()  # its hold is taken
                with ledger_locked(engine):
                    go.set()
                    while not runs(_Run.close.__code__):  # its capture waits for the ledger
                        await anyio.sleep(0.01)
                    tasks[0].cancel()
            while runs(_Run.close.__code__):
                await anyio.sleep(0.01)
            return await client.call_tool("search", {"q": "a"}, meta=key)

    retried = anyio.run(scenario)
    assert retried.meta is not None and retried.meta[REPLAYED_META] is True
    assert receipt_of(retried)["amount"] == str(PRICE)
    view = token_view(engine, token)
    assert (view.spent, view.held, view.remaining) == (PRICE, 0, usd("0.05") - PRICE)
    with reading(engine) as conn:
        statuses = sorted(conn.execute(select(calls.c.status)).scalars())
        voids = conn.execute(select(func.count()).where(events.c.kind == "void")).scalar()
    assert statuses == ["captured"] and voids == 0
    got = samples(billing)
    assert got.get(("mcpbill_calls_total", (("outcome", "voided"), ("tool", "search")))) is None
    assert got[("mcpbill_calls_total", (("outcome", "captured"), ("tool", "search")))] == 1
    assert got[("mcpbill_holds_open", ())] == 0
