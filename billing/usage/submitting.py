"""Submitting: pending outbox rows become Stripe meter events.

Each row is sent with its fixed identifier and an idempotency key derived from it. A crash after
Stripe accepted but before we recorded it is repaired by the next flush: the re-send is answered
"An event already exists with identifier …", which means delivered. Stripe keeps identifiers for
at least 24 hours only, so a row unsent for longer is held for reconciliation instead of re-sent.

Only an error about one request fails its row. An error about the account (key, permissions), a
meter or a customer stops sending for what it is about and leaves those rows pending, so the next
flush after the fix bills them once (`stripe_gateway.ErrorScope`).

Rows go out in lanes, at most one call in flight per (customer, meter), as Stripe allows. The
lane threads live as long as the run, so each keeps its HTTP keep-alive connection (stripe-python
holds one `requests` session per thread) instead of opening new ones for every batch.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_when_event_set

from billing import logs
from billing.config import Settings
from billing.models import BillingAccount, SubmissionStatus, UsageSubmission
from billing.stripe_gateway import (
    ErrorScope,
    MeterEvent,
    MeterEventOutcome,
    PermanentStripeError,
    StripeGateway,
    StripeGatewayError,
    TransientStripeError,
)
from billing.usage import retry_policy
from billing.usage.result import FlushResult

log = logs.get_logger("billing.usage")

# Outcomes of a row that is left pending because an error about more than the row stopped it:
STOPPED = "stopped"  # this row's call got the error
SKIPPED = "skipped"  # not sent: an earlier row's error already covers it
ACTIVE_METER = "active"


class Stops:
    """What errors about more than one row have stopped, shared by the submit lanes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.run = threading.Event()  # set: every lane stops at once
        self.run_error: str | None = None
        self.meters: dict[str, str] = {}
        self.customers: dict[str, str] = {}

    def stop(self, error: StripeGatewayError, row: UsageSubmission) -> None:
        if error.scope == ErrorScope.RUN:
            self.stop_run(str(error))
        elif error.scope == ErrorScope.METER:
            self.stop_meter(row.event_name, str(error))
        elif error.scope == ErrorScope.CUSTOMER:
            with self._lock:
                self.customers.setdefault(row.stripe_customer_id, str(error))

    def stop_run(self, error: str) -> None:
        with self._lock:
            self.run_error = self.run_error or error
            self.run.set()

    def stop_meter(self, event_name: str, error: str) -> None:
        with self._lock:
            self.meters.setdefault(event_name, error)

    def stopped_meters(self) -> set[str]:
        """A copy: lanes add entries while the claimer reads."""
        with self._lock:
            return set(self.meters)

    def stopped_customers(self) -> list[str]:
        with self._lock:
            return sorted(self.customers)

    def covering(self, row: UsageSubmission) -> tuple[ErrorScope, str] | None:
        """The stop that covers this row, if any: (scope, error)."""
        if self.run.is_set():
            return ErrorScope.RUN, self.run_error or ""
        if row.event_name in self.meters:
            return ErrorScope.METER, self.meters[row.event_name]
        if row.stripe_customer_id in self.customers:
            return ErrorScope.CUSTOMER, self.customers[row.stripe_customer_id]
        return None


class Attempt(NamedTuple):
    """What happened to one outbox row in this pass."""

    row: UsageSubmission
    outcome: str  # a MeterEventOutcome, `failed`, `pending`, STOPPED or SKIPPED
    error: str | None = None
    scope: ErrorScope | None = None


class Submitter:
    """Sends and records outbox rows for one flush run; `close()` ends its lane threads."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        gateway: StripeGateway,
        stops: Stops,
        result: FlushResult,
        *,
        organization_id: int | None,
        clock: Callable[[], datetime],
        call_attempts: int,
    ) -> None:
        self.settings = settings
        self.sessions = session_factory
        self.gateway = gateway
        self.stops = stops
        self.result = result
        self.organization_id = organization_id
        self.clock = clock
        self.call_attempts = call_attempts
        self._lanes = ThreadPoolExecutor(
            max_workers=max(1, settings.submit_concurrency), thread_name_prefix="meter-submit"
        )

    def close(self) -> None:
        self._lanes.shutdown(wait=True)

    def check_before_claiming(self) -> None:
        """One read before anything is claimed: a refused key stops the run and a meter Stripe
        lacks stops that meter, so their usage stays unclaimed (not parked in the outbox, ageing
        towards the identifier window) until the configuration is fixed.

        Only a 401 stops the run here: a restricted key may send meter events without being
        allowed to list meters. Any other failure leaves the checking to the sends."""
        try:
            meters = self.gateway.meter_by_event_name()
        except TransientStripeError:
            return
        except PermanentStripeError as error:
            if error.status == 401:
                self.stops.stop_run(str(error))
            return
        for event_name in sorted(set(self.settings.stripe_meters.values())):
            meter = meters.get(event_name)
            if meter is None or meter.status != ACTIVE_METER:
                self.stops.stop_meter(
                    event_name, f"No active Stripe meter has the event name {event_name!r}"
                )

    def pending_submission_ids(self) -> list[int]:
        query = sa.select(UsageSubmission.id).where(
            UsageSubmission.status == SubmissionStatus.PENDING.value
        )
        if self.organization_id is not None:
            query = query.where(UsageSubmission.organization_id == self.organization_id)
        with self.sessions() as session:
            return list(session.scalars(query.order_by(UsageSubmission.id)))

    def hold_stale_submissions(self) -> None:
        """Unsent past Stripe's identifier window: a re-send could bill twice. Hold and report."""
        cutoff = self.clock() - timedelta(hours=self.settings.resend_window_hours)
        query = sa.select(UsageSubmission).where(
            UsageSubmission.status == SubmissionStatus.PENDING.value,
            UsageSubmission.created_at < cutoff,
        )
        if self.organization_id is not None:
            query = query.where(UsageSubmission.organization_id == self.organization_id)
        with self.sessions.begin() as session:
            for row in session.scalars(query):
                row.status = SubmissionStatus.HELD.value
                row.last_error = (
                    f"unsent for over {self.settings.resend_window_hours}h; reconcile against "
                    "Stripe meter event summaries before re-sending"
                )
                self.result.submissions_held += 1
                log.warning(
                    logs.FLUSH_HELD,
                    extra={
                        "organization_id": row.organization_id,
                        "idempotency_key": row.idempotency_key,
                        "identifier": row.identifier,
                        "value": row.value,
                    },
                )

    def submit(self, submission_ids: Sequence[int]) -> None:
        """Send outbox rows, at most one call in flight per (customer, meter), N lanes at once."""
        if not submission_ids:
            return
        with self.sessions() as session:
            rows = list(
                session.scalars(
                    sa.select(UsageSubmission).where(
                        UsageSubmission.id.in_(submission_ids),
                        UsageSubmission.status == SubmissionStatus.PENDING.value,
                    )
                )
            )
            self._repoint(session, rows)
        lanes: dict[tuple[str, str], list[UsageSubmission]] = defaultdict(list)
        for row in rows:
            lanes[(row.stripe_customer_id, row.event_name)].append(row)
        # carry_context: the lanes' log lines keep the task_id/task_name bound by the caller.
        submit_lane = logs.carry_context(self._submit_lane)
        outcomes = [o for lane in self._lanes.map(submit_lane, lanes.values()) for o in lane]
        self.record(outcomes)

    def _repoint(self, session: Session, rows: list[UsageSubmission]) -> None:
        """Rows that Stripe refused for their meter or customer follow the fixed configuration.

        Safe: a refused meter or customer means Stripe never accepted the row under that name, and
        the identifier (which dedupes billing) stays the same."""
        for row in rows:
            if row.last_error_scope == ErrorScope.METER:
                row.event_name = self.settings.stripe_meters.get(row.event_type, row.event_name)
        orgs = {r.organization_id for r in rows if r.last_error_scope == ErrorScope.CUSTOMER}
        if not orgs:
            return
        customers = dict(
            session.execute(
                sa.select(BillingAccount.organization_id, BillingAccount.stripe_customer_id).where(
                    BillingAccount.organization_id.in_(sorted(orgs)),
                    BillingAccount.stripe_customer_id.is_not(None),
                )
            ).all()
        )
        for row in rows:
            if row.last_error_scope == ErrorScope.CUSTOMER and row.organization_id in customers:
                row.stripe_customer_id = customers[row.organization_id]

    def _submit_lane(self, rows: Iterable[UsageSubmission]) -> list[Attempt]:
        return [self._submit_one(row) for row in rows]

    def _submit_one(self, row: UsageSubmission) -> Attempt:
        covering = self.stops.covering(row)
        if covering is not None:
            return Attempt(row, SKIPPED, covering[1], covering[0])
        if self.call_attempts < 1:
            return Attempt(row, SKIPPED)
        fields = {
            "organization_id": row.organization_id,
            "idempotency_key": row.idempotency_key,
            "event_name": row.event_name,
            "value": row.value,
            "identifier": row.identifier,
        }
        event = MeterEvent(
            event_name=row.event_name,
            stripe_customer_id=row.stripe_customer_id,
            value=row.value,
            timestamp=row.window_start,
            identifier=row.identifier,
            idempotency_key=row.idempotency_key,
        )
        attempt = 0

        def send() -> MeterEventOutcome:
            nonlocal attempt
            attempt += 1
            log.info(logs.METER_SUBMIT_ATTEMPT, extra={**fields, "attempt": attempt})
            return self.gateway.send_meter_event(event)

        try:
            outcome = self._call_retrying(send)
        except PermanentStripeError as error:
            log.error(
                logs.METER_SUBMIT_FAILED,
                extra={**fields, "error": str(error), "transient": False, "scope": error.scope},
            )
            if error.scope != ErrorScope.ROW:
                self.stops.stop(error, row)
                return Attempt(row, STOPPED, str(error), error.scope)
            return Attempt(row, SubmissionStatus.FAILED.value, str(error), error.scope)
        except TransientStripeError as error:
            log.warning(
                logs.METER_SUBMIT_FAILED, extra={**fields, "error": str(error), "transient": True}
            )
            return Attempt(row, SubmissionStatus.PENDING.value, str(error))
        log.info(logs.METER_SUBMIT_SUCCEEDED, extra={**fields, "outcome": outcome.value})
        return Attempt(row, outcome.value)

    def _call_retrying(self, send: Callable[[], MeterEventOutcome]) -> MeterEventOutcome:
        """Transient errors (429, 409, 5xx, connection) are retried here, within the row's share
        of the run's call budget (`usage.retry_policy`); a run-level stop ends the retries."""
        retrying = Retrying(
            stop=stop_after_attempt(self.call_attempts) | stop_when_event_set(self.stops.run),
            wait=retry_policy.call_wait(self.settings),
            retry=retry_if_exception_type(TransientStripeError),
            reraise=True,
        )
        return retrying(send)

    def record(self, attempts: list[Attempt]) -> None:
        now = self.clock()
        updates: list[dict[str, Any]] = []
        for row, outcome, error, scope in attempts:
            delivered = outcome in (MeterEventOutcome.ACCEPTED, MeterEventOutcome.DUPLICATE)
            called = outcome != SKIPPED
            if outcome in (STOPPED, SKIPPED):
                self.result.submissions_stopped += 1
                if not called and scope in (None, ErrorScope.RUN):
                    continue  # nothing learnt about this row
            status = (
                SubmissionStatus.SENT.value
                if delivered
                else outcome
                if outcome == SubmissionStatus.FAILED.value
                else SubmissionStatus.PENDING.value
            )
            refused = outcome in (STOPPED, SubmissionStatus.FAILED.value)
            updates.append(
                {
                    "id": row.id,
                    "status": status,
                    "attempts": row.attempts + (1 if called else 0),
                    "last_error": error,
                    "last_error_scope": scope.value if scope else None,
                    "event_name": row.event_name,
                    "stripe_customer_id": row.stripe_customer_id,
                    "sent_at": now if delivered else None,
                    "updated_at": now,
                    # Stripe may keep a refusal under the idempotency key; the next send of this
                    # row is a new request (its identifier, which dedupes billing, is unchanged).
                    "key_generation": row.key_generation + (1 if refused else 0),
                }
            )
            if outcome in (STOPPED, SKIPPED):
                continue
            if delivered:
                self.result.submissions_sent += 1
                if outcome == MeterEventOutcome.DUPLICATE:
                    self.result.submissions_already_delivered += 1
                billed = self.result.billed_value
                billed[row.event_type] = billed.get(row.event_type, 0) + row.value
            elif status == SubmissionStatus.FAILED.value:
                self.result.submissions_failed += 1
                self.result.last_error = error
            else:
                self.result.submissions_pending += 1
                self.result.last_error = error
        if not updates:
            return
        with self.sessions.begin() as session:
            # A meter error report can mark a row rejected while its batch is still in flight
            # (Stripe answers 200, then refuses it): that verdict stands over this run's "sent".
            # Row locks (in id order, as `usage.rejections.mark_rejected` takes them) order the
            # two writes.
            locked = session.execute(
                sa.select(UsageSubmission.id, UsageSubmission.status)
                .where(UsageSubmission.id.in_([u["id"] for u in updates]))
                .order_by(UsageSubmission.id)
                .with_for_update()
            ).all()
            rejected = {row.id for row in locked if row.status == SubmissionStatus.REJECTED.value}
            updates = [u for u in updates if u["id"] not in rejected]
            if updates:
                session.execute(sa.update(UsageSubmission), updates)

    # Reporting --------------------------------------------------------------------------------
