"""`mcpbill webhooks ...`: endpoints for alert events, their deliveries, and the deliverer."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mcpbill_cli.cli.output import (
    Column,
    JsonOption,
    OutputOption,
    emit,
    emit_listing,
    handles_errors,
    output_format,
    say,
    timestamp,
    to_jsonable,
)
from mcpbill_cli.cli.state import state
from mcpbill_cli.errors import InvalidInput, NotFound

app = typer.Typer(help="Signed webhooks (Standard Webhooks) for alerts: token thresholds, low "
                       "balances, caps reached, refunds, reconcile findings.",
                  no_args_is_help=True)

EndpointArgument = Annotated[str, typer.Argument(
    metavar="ID", help="The endpoint's id (whep_…), as `mcpbill webhooks list` shows it.")]
ENDPOINT_COLUMNS = (Column("id", lambda e: e.id, ident=True),
                    Column("url", lambda e: _shown_url(e.url)),
                    Column("events", lambda e: e.event_types),
                    Column("enabled", lambda e: e.enabled),
                    Column("created_at", lambda e: timestamp(e.created_at)))
DELIVERY_COLUMNS = (Column("event_id", lambda d: d.event_id, ident=True),
                    Column("endpoint_id", lambda d: d.endpoint_id, ident=True),
                    Column("type", lambda d: d.type), Column("status", lambda d: d.status),
                    Column("attempts", lambda d: d.attempts),
                    Column("last_status", lambda d: d.last_status),
                    Column("next_attempt_at", lambda d: timestamp(d.next_attempt_at)))


@app.command("add")
@handles_errors
def add(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="Where to POST events (http:// or https://).")],
    events: Annotated[str, typer.Option(
        "--events", help="Comma-separated event types, or * for all: token.threshold, "
                         "tenant.balance_low, cap.reached, refund.created, "
                         "reconcile.findings.")] = "*",
    as_json: JsonOption = False,
) -> None:
    """Add an endpoint; prints its signing secret (whsec_…) on stdout, this once only.

    The secret is the one way to hand the receiver what it verifies signatures with (Standard
    Webhooks: webhook-id, webhook-timestamp, webhook-signature headers): it is never shown
    again, nor logged; --json includes it as `secret` in this command's output only. Example:
    SECRET=$(mcpbill webhooks add https://ops.example.com/hooks --events
    refund.created,cap.reached)
    """
    from mcpbill_cli.ledger import outbox
    from mcpbill_cli.ledger.engine import writing

    types = _event_types(events)
    _check_url(url)
    st = state(ctx)
    at = st.now()
    with writing(st.engine()) as conn:
        endpoint, secret = outbox.add_endpoint(conn, url, types, at=at)
    _owner_only(st.settings.db_url)
    data = {**_endpoint_json(endpoint), "secret": secret}
    emit(data, as_json=as_json, human=lambda: _print_secret(endpoint.id, secret),
         lost=f"webhook endpoint {endpoint.id} was added but its signing secret, never shown "
              f"again, was not printed; `mcpbill webhooks remove {endpoint.id}` removes it, "
              "then add it again")


def _print_secret(endpoint_id: str, secret: str) -> None:
    typer.echo(secret)  # first: the one thing the receiver must get
    say(f"added webhook endpoint {endpoint_id}; its signing secret, shown this once, is on "
        "stdout: give it to the receiver")


def _owner_only(db_url: str) -> None:
    """A SQLite ledger now holds a webhook secret: mode 0600, as for the keys (its -wal and
    -shm files too). A PostgreSQL ledger's access is the server's roles'."""
    import os

    from mcpbill_cli.ledger.engine import sqlite_file

    path = sqlite_file(db_url)
    if path is None:
        return
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists():
            os.chmod(file, 0o600)


def _event_types(events: str) -> list[str]:
    from mcpbill_cli.ledger.outbox import ALL_TYPES, EVENT_TYPES

    types = [t.strip() for t in events.split(",") if t.strip()]
    unknown = [t for t in types if t not in (*EVENT_TYPES, ALL_TYPES)]
    if not types or unknown:
        raise InvalidInput(f"unknown event types {unknown or [events]}: use * or any of "
                           f"{', '.join(EVENT_TYPES)}", field="events")
    return [ALL_TYPES] if ALL_TYPES in types else types


def _check_url(url: str) -> None:
    from mcpbill_cli.urls import http_url_problem

    problem = http_url_problem(url)
    if problem is not None:
        raise InvalidInput(f"not a usable http(s) URL ({problem}): {_shown_url(url)}",
                           field="url")


def _endpoint_json(endpoint: Any) -> dict[str, Any]:
    data: dict[str, Any] = to_jsonable(endpoint)
    data["url"] = _shown_url(endpoint.url)
    return data


def _shown_url(url: str) -> str:
    """An endpoint's URL as printed: a password or a secret parameter in it masked, as in
    every other URL the CLI prints (listings end up in scrollback and CI logs). The ledger
    keeps it whole, and deliveries use it whole."""
    from mcpbill_cli.redaction import redact

    return redact(url)


@app.command("list")
@handles_errors
def list_endpoints(ctx: typer.Context, output: OutputOption = None,
                   as_json: JsonOption = False) -> None:
    """List webhook endpoints: id, URL, event types, enabled. Never their secrets.

    Example: mcpbill webhooks list --json
    """
    from mcpbill_cli.ledger import outbox
    from mcpbill_cli.ledger.engine import reading

    with reading(state(ctx).engine()) as conn:
        found = outbox.endpoints(conn)
    emit_listing(found, ENDPOINT_COLUMNS, output=output_format(output, as_json),
                 records=[_endpoint_json(e) for e in found])


@app.command("remove")
@handles_errors
def remove(ctx: typer.Context, endpoint_id: EndpointArgument,
           as_json: JsonOption = False) -> None:
    """Remove an endpoint; its deliveries not yet made are dropped with it.

    Example: mcpbill webhooks remove whep_0123456789abcdef
    """
    from mcpbill_cli.ledger import outbox
    from mcpbill_cli.ledger.engine import writing

    with writing(state(ctx).engine()) as conn:
        dropped = outbox.remove_endpoint(conn, endpoint_id)
    if dropped is None:
        raise NotFound(f"no webhook endpoint {endpoint_id}; `mcpbill webhooks list` shows them",
                       endpoint_id=endpoint_id)
    emit({"id": endpoint_id, "removed": True, "pending_dropped": dropped}, as_json=as_json,
         human=lambda: say(f"removed {endpoint_id} ({dropped} pending deliveries dropped)"))


@app.command("test")
@handles_errors
def test(ctx: typer.Context, endpoint_id: EndpointArgument,
         as_json: JsonOption = False) -> None:
    """Send a signed webhook.test event to one endpoint now and report what it answered.

    Exits 31 (WEBHOOK_FAILED) when the endpoint did not answer 2xx; the event is then retried
    by `mcpbill webhooks deliver` like any other. Example: mcpbill webhooks test whep_0123…
    """
    from mcpbill_cli.errors import WebhookFailed
    from mcpbill_cli.webhooks import describe, send_test

    st = state(ctx)
    event_id, attempt = send_test(st.engine(), endpoint_id, clock=st.clock())
    if attempt is None or attempt.outcome != "delivered":
        raise WebhookFailed(f"{endpoint_id} did not take the test event {event_id}: "
                            f"{attempt.error if attempt else 'another deliverer has it'}",
                            event_id=event_id, endpoint_id=endpoint_id)
    emit(describe(attempt), as_json=as_json,
         human=lambda: say(f"delivered {event_id} to {endpoint_id} (HTTP {attempt.status})"))


@app.command("deliveries")
@handles_errors
def deliveries(
    ctx: typer.Context,
    endpoint_id: Annotated[str | None, typer.Argument(
        metavar="[ID]", help="Only this endpoint's deliveries.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many, newest "
                                                               "first.")] = 100,
    output: OutputOption = None,
    as_json: JsonOption = False,
) -> None:
    """List webhook deliveries, newest first: event, endpoint, status (pending, delivered,
    failed), attempts, the receiver's last HTTP status and the next attempt.

    Example: mcpbill webhooks deliveries whep_0123456789abcdef --json
    """
    from mcpbill_cli.ledger import outbox
    from mcpbill_cli.ledger.engine import reading

    with reading(state(ctx).engine()) as conn:
        if endpoint_id is not None and outbox.endpoint(conn, endpoint_id) is None:
            raise NotFound(f"no webhook endpoint {endpoint_id}; `mcpbill webhooks list` shows "
                           "them", endpoint_id=endpoint_id)
        found = outbox.deliveries(conn, endpoint_id=endpoint_id, limit=limit)
    emit_listing(found, DELIVERY_COLUMNS, output=output_format(output, as_json),
                 records=[to_jsonable(d) for d in found])


@app.command("deliver")
@handles_errors
def deliver(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option(
        "--once", help="Deliver what is due now, then exit.")] = False,
    interval: Annotated[float, typer.Option(
        "--interval", min=0.05, help="Seconds between passes when running on.")] = 1.0,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.1, help="Seconds a receiver has to answer.")] = 10.0,
    backoff: Annotated[float, typer.Option(
        "--backoff", min=0.01, help="Seconds before a failed delivery's first retry; doubled "
                                    "for each one after (with jitter).")] = 5.0,
    as_json: JsonOption = False,
) -> None:
    """Deliver pending webhook events, signed; runs until stopped (Ctrl-C), or --once.

    State is in the ledger: stop or restart it at any time, run several at once (each event
    goes to each endpoint at least once, never by two deliverers at the same time). Example:
    mcpbill webhooks deliver --once --json
    """
    from mcpbill_cli.webhooks import Deliverer, describe

    st = state(ctx)
    deliverer = Deliverer(st.engine(), st.clock(), timeout=timeout, backoff=backoff,
                          interval=interval)
    if not once:
        say("delivering webhooks; Ctrl-C stops")
        try:
            deliverer.run()
        except KeyboardInterrupt:
            pass
        return
    attempts = deliverer.deliver_due()
    delivered = sum(a.outcome == "delivered" for a in attempts)
    emit({"attempts": [describe(a) for a in attempts], "delivered": delivered},
         as_json=as_json,
         human=lambda: say(f"{delivered} delivered, {len(attempts) - delivered} to retry"))


@app.command("balance-alert")
@handles_errors
def balance_alert(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="The tenant to watch.")],
    below: Annotated[str | None, typer.Option(
        "--below", help="USDC: alert when its available balance falls under this.")] = None,
    off: Annotated[bool, typer.Option("--off", help="Stop alerting for this tenant.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Send tenant.balance_low when a tenant's available balance falls under an amount.

    Once per crossing: a balance that is funded back over it and falls again alerts again.
    Example: mcpbill webhooks balance-alert acme --below 25
    """
    from mcpbill_cli.ledger.alerts import set_tenant_alert
    from mcpbill_cli.ledger.engine import writing
    from mcpbill_cli.money import format_usd, parse_usd

    if (below is None) == (not off):
        raise InvalidInput("give --below AMOUNT or --off: exactly one", field="below")
    st = state(ctx)
    st.require_tenant(tenant)
    micro = None if below is None else parse_usd(below, field="below")
    with writing(st.engine()) as conn:
        set_tenant_alert(conn, tenant, micro)
    shown = None if micro is None else format_usd(micro)
    emit({"tenant": tenant, "below_usd": shown}, as_json=as_json,
         human=lambda: say(f"tenant {tenant}: " + (f"alert under {shown} USDC" if shown
                                                  else "no balance alert")))
