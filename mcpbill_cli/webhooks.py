"""Webhook delivery: sends the ledger's outbox (:mod:`mcpbill_cli.ledger.outbox`) to endpoints,
signed as Standard Webhooks.

Each request is a POST of the event's JSON with ``webhook-id`` (the event's stable id: the
same on every retry, so a receiver dedupes on it), ``webhook-timestamp`` and
``webhook-signature`` (``v1,`` HMAC-SHA256 of ``id.timestamp.body`` with the endpoint's
``whsec_`` secret, by the ``standardwebhooks`` package). A 2xx answer delivers it; anything
else (another status, a refused connection, a timeout) is retried with exponential backoff and
jitter, up to ``max_attempts``, then the delivery is ``failed``.

The state is all in the ledger, so a deliverer may stop or die at any moment: a delivery it
had claimed comes due again when its lease (twice the request timeout, plus a second) ends,
and another deliverer, or the same one restarted, sends it. Delivery is at least once; any
number of deliverers may run against one ledger (claims are guarded UPDATEs). Runs from
``mcpbill webhooks deliver`` or as a thread of a verifier's process (:meth:`Deliverer.start`).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from mcpbill_cli.errors import BillingError
from mcpbill_cli.ledger import outbox
from mcpbill_cli.ledger.engine import reading, writing

logger = logging.getLogger("mcpbill")

TIMEOUT = 10.0  # seconds a receiver has to answer
BACKOFF = 5.0  # seconds before the first retry; doubled for each retry after it
MAX_BACKOFF = 3600.0
MAX_ATTEMPTS = 12  # with the defaults: retries for about six hours
BATCH = 50


@dataclass(frozen=True)
class Attempt:
    """What one delivery attempt did: ``delivered``, ``retry`` or ``failed``; ``status`` the
    receiver's HTTP status (None when none answered)."""

    event_id: str
    endpoint_id: str
    outcome: str
    status: int | None
    error: str | None = None


@dataclass
class Deliverer:
    engine: Engine
    clock: Callable[[], datetime]
    timeout: float = TIMEOUT
    backoff: float = BACKOFF
    max_backoff: float = MAX_BACKOFF
    max_attempts: int = MAX_ATTEMPTS
    interval: float = 1.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def lease(self) -> timedelta:
        """How long a claim lasts: a request times out well before it ends."""
        return timedelta(seconds=2 * self.timeout + 1)

    def deliver_due(self, *, event_id: str | None = None) -> list[Attempt]:
        """One pass: every delivery due now (or of ``event_id`` only), each claimed, sent and
        recorded; what each attempt did."""
        attempts: list[Attempt] = []
        while not self._stop.is_set():
            with reading(self.engine) as conn:
                batch = outbox.due(conn, now=self.clock(), limit=BATCH, event_id=event_id)
            done = [a for a in (self._deliver(*pair) for pair in batch) if a is not None]
            attempts += done
            if len(batch) < BATCH or not done:
                return attempts
        return attempts

    def _deliver(self, event_id: str, endpoint_id: str) -> Attempt | None:
        with writing(self.engine) as conn:
            job = outbox.claim(conn, event_id, endpoint_id, now=self.clock(), lease=self.lease)
        if job is None:
            return None  # another deliverer has it, or it is done
        status, error = self._send(job)
        return self._record(job, status, error)

    def _send(self, job: outbox.Job) -> tuple[int | None, str | None]:
        import httpx
        from standardwebhooks import Webhook

        sent_at = self.clock()
        headers = {"content-type": "application/json", "webhook-id": job.event_id,
                   "webhook-timestamp": str(int(sent_at.timestamp())),
                   "webhook-signature": Webhook(job.secret).sign(job.event_id, sent_at,
                                                                 job.payload)}
        try:
            response = httpx.post(job.url, content=job.payload.encode(), headers=headers,
                                  timeout=self.timeout, follow_redirects=False)
        except Exception as exc:  # noqa: BLE001 - any failure to send is this delivery's alone
            # (httpx.HTTPError, and httpx.InvalidURL and ValueError for a URL it cannot use,
            # which are not HTTPError: they ended the whole deliverer, every endpoint with it)
            return None, f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return response.status_code, None
        return response.status_code, f"HTTP {response.status_code}"

    def _record(self, job: outbox.Job, status: int | None, error: str | None) -> Attempt:
        now = self.clock()
        with writing(self.engine) as conn:
            if error is None:
                outbox.delivered(conn, job, status=status or 0, at=now)
                logger.info("webhook %s delivered to %s (HTTP %s)", job.event_id,
                            job.endpoint_id, status)
                return Attempt(job.event_id, job.endpoint_id, "delivered", status)
            retry_at = (None if job.attempts >= self.max_attempts
                        else now + timedelta(seconds=self.retry_delay(job.attempts)))
            outbox.attempt_failed(conn, job, status=status, error=error, retry_at=retry_at)
        logger.warning("webhook %s to %s failed (attempt %d: %s)%s", job.event_id,
                       job.endpoint_id, job.attempts, error,
                       "; giving up" if retry_at is None else "")
        return Attempt(job.event_id, job.endpoint_id, "failed" if retry_at is None else "retry",
                       status, error)

    def retry_delay(self, attempts: int) -> float:
        """Seconds before the next attempt after ``attempts``: exponential, capped, and
        jittered down by up to half, so endpoints that failed together are not retried in
        lockstep."""
        delay = min(self.max_backoff, self.backoff * float(2 ** max(attempts - 1, 0)))
        return delay * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret

    def run(self) -> None:
        """Deliver every ``interval`` until :meth:`stop`; a failing ledger is retried."""
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except BillingError as exc:  # the ledger is down: try again next turn
                logger.warning("could not deliver webhooks: %s", exc.message)
            except DBAPIError as exc:  # the loop must outlive any one bad turn
                logger.error("webhook delivery failed (%s); trying again", type(exc.orig).__name__)
            self._stop.wait(self.interval)

    def start(self) -> None:
        """Deliver from a daemon thread of this process (a verifier's)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name="mcpbill-webhooks",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop after the attempt in flight (its result is recorded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 5)


def send_test(engine: Engine, endpoint_id: str, *, clock: Callable[[], datetime],
              timeout: float = TIMEOUT) -> tuple[str, Attempt | None]:
    """A ``webhook.test`` event to one endpoint, delivered now; its id and what the attempt
    did (None when another deliverer took it first). A failed test is retried like any."""
    from mcpbill_cli.errors import NotFound

    now = clock()
    with writing(engine) as conn:
        if outbox.endpoint(conn, endpoint_id) is None:
            raise NotFound(f"no webhook endpoint {endpoint_id}; `mcpbill webhooks list` shows "
                           "them", endpoint_id=endpoint_id)
        event_id = outbox.emit(conn, "webhook.test", {"endpoint_id": endpoint_id}, at=now,
                               endpoint_id=endpoint_id)
    assert event_id is not None  # noqa: S101 - a new id is never taken
    attempts = Deliverer(engine, clock, timeout=timeout).deliver_due(event_id=event_id)
    return event_id, attempts[0] if attempts else None


def describe(attempt: Attempt) -> dict[str, Any]:
    return {"event_id": attempt.event_id, "endpoint_id": attempt.endpoint_id,
            "outcome": attempt.outcome, "http_status": attempt.status, "error": attempt.error}
