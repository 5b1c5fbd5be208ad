"""Usage corrections, applied by the flush, exactly once, the cheapest correct way for their age.

After a pass has claimed and sent its usage, `apply_corrections` (1) takes pending upstream rows
(`billable_event_corrections`) in as corrections, or rejects them with the reason; (2) plans each
`requested` correction in one transaction (`usage.corrections.choose_method`):
- `cancel_restate`, the group has meter events Stripe received less than 24 hours ago and the
  period is open: those outbox rows become `cancelling` (a `usage_correction_cancels` row each)
  and the correction `cancelling`;
- `correcting_event`, older, the period open: an outbox row of value = delta (negative to
  retract: Stripe's documented fix; a period's negative total is invoiced as 0), `sending`;
- `credit`, the period was invoiced: a `billing_adjustments` credit at the subscription's
  per-unit price, which the next `invoice.created` applies once, as every credit; `applied`;
(3) asks Stripe to cancel each requested meter event; (4) releases each correction whose cancels
are all answered: a NEW outbox row (new identifier) carrying Σ cancelled + delta, `sending` (or
`applied` when that is 0); (5) sends those rows; (6) a `sending` correction whose row is `sent`
is `applied` (logged as `Stripe usage correction applied`, counted by method).

Exact for any outcome of the cancels: Stripe's group total was billed_before; the cancelled part
C leaves it, the new row puts back C + delta, so it becomes billed_before + delta, with C anywhere
from nothing (every cancel refused) to all the targets.

Every meter event is an ordinary outbox row (the submitter, identifiers, idempotency keys and
crash repair of the flush), so a crash anywhere resumes and never doubles or loses:
- after the plan, before a cancel: the next pass finds the cancel requested and asks;
- Stripe took a cancel but the answer was lost: the attempt was recorded before the call, and the
  repeat with the same idempotency key is answered with Stripe's stored 200 (keys are kept at
  least 24 hours; within `REPLAY_WINDOW` of the first attempt a refusal is a real one, later it
  may hide an earlier success: the correction is `held` for reconciliation, never guessed);
- released but not sent: a pending outbox row, re-sent by the next pass; sent but not recorded:
  "already exists" is delivered.
Concurrent passes (an unguarded `flush_now` beside the invoice flush) skip rows another holds
(`FOR UPDATE SKIP LOCKED`), and every change is guarded by the status it was read in.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_when_event_set

from billing import logs, metrics
from billing.checks.billability import HOUR, MAX_EVENT_AGE
from billing.models import (
    AdjustmentKind,
    BillableEventCorrection,
    BillingAccount,
    BillingAdjustment,
    CancelStatus,
    CorrectionMethod,
    CorrectionSource,
    CorrectionStatus,
    SubmissionStatus,
    UsageCorrection,
    UsageCorrectionCancel,
    UsageSubmission,
    pending_correction,
    utcnow,
)
from billing.runtime import Runtime
from billing.stripe_gateway import (
    ErrorScope,
    PermanentStripeError,
    StripeGatewayError,
    TransientStripeError,
)
from billing.usage import retry_policy
from billing.usage.claiming import usage_identifier
from billing.usage.corrections import (
    UPSTREAM_KEY_PREFIX,
    CorrectionError,
    CorrectionRequest,
    CreditPrice,
    Period,
    cancel_targets,
    check_credit_cents,
    choose_method,
    credit_price,
    lock_organization,
    record_in,
    refresh_stale_period,
    refuse_unplannable,
)
from billing.usage.submitting import Submitter

log = logs.get_logger("billing.usage")

INTAKE_BATCH = 500
# Stripe replays a stored answer for an idempotency key for at least 24 hours; an hour's margin.
REPLAY_WINDOW = timedelta(hours=23)

REQUESTED = CorrectionStatus.REQUESTED.value
CANCELLING = CorrectionStatus.CANCELLING.value
SENDING = CorrectionStatus.SENDING.value
APPLIED = CorrectionStatus.APPLIED.value
FAILED = CorrectionStatus.FAILED.value
HELD = CorrectionStatus.HELD.value
OPEN_CANCELS = (CancelStatus.REQUESTED.value, CancelStatus.UNKNOWN.value)


def apply_corrections(submitter: Submitter) -> None:
    """The flush's correction step (`usage.run`), with the pass's submitter and its stops."""
    Corrector(submitter).run()


@dataclass(frozen=True)
class Applied:
    """What the log line and the counter say of an applied correction."""

    correction_id: int
    organization_id: int
    event_type: str
    hour: datetime
    delta: int
    method: str
    idempotency_key: str
    billed_before: int

    @classmethod
    def of(cls, c: UsageCorrection) -> Applied:
        assert c.method is not None
        return cls(
            c.id,
            c.organization_id,
            c.event_type,
            c.hour,
            c.delta,
            c.method,
            c.idempotency_key,
            c.billed_before,
        )


class Corrector:
    """One pass's correction step: in the pass's scope (one organization, or all), skipping
    what the pass's stops cover (the run, a meter, a customer)."""

    def __init__(self, submitter: Submitter) -> None:
        self.submitter = submitter
        self.settings = submitter.settings
        self.sessions = submitter.sessions
        self.gateway = submitter.gateway
        self.stops = submitter.stops
        self.result = submitter.result
        self.organization_id = submitter.organization_id
        self.clock = submitter.clock
        self._meters: dict[str, Any] | None = None
        self._to_send: list[int] = []  # outbox rows this pass wrote: correcting and restated

    def run(self) -> None:
        steps: list[Callable[[], None]] = [self.take_upstream, self.plan_requested, self.cancel]
        for step in steps:
            if self.stops.run.is_set():
                break
            step()
        if not self.stops.run.is_set():
            self._to_send += self.release()
            self.submitter.submit(self._to_send)
        self.finish()
        self.count()

    # Scope ----------------------------------------------------------------------------------

    def _scoped(self, query: Any, column: Any) -> Any:
        return (
            query if self.organization_id is None else query.where(column == self.organization_id)
        )

    def _stopped(self, event_type: str, customer: str | None) -> bool:
        if self.stops.run.is_set():
            return True
        if self.settings.stripe_meters.get(event_type) in self.stops.stopped_meters():
            return True
        return customer is not None and customer in self.stops.stopped_customers()

    def _meter(self, event_type: str) -> Any | None:
        """The Stripe meter of an event type (read once a pass), None when unmapped."""
        if self._meters is None:
            self._meters = self.gateway.meter_by_event_name()
        name = self.settings.stripe_meters.get(event_type)
        return None if name is None else self._meters.get(name)

    # 1. Upstream rows -----------------------------------------------------------------------

    def take_upstream(self) -> None:
        """Each pending `billable_event_corrections` row becomes a correction, or is rejected
        with the reason (it stays: a producer fixes it by writing a new row with a new key)."""
        after = 0
        while not self.stops.run.is_set():
            query = (
                sa.select(BillableEventCorrection.id)
                .where(pending_correction(), BillableEventCorrection.id > after)
                .order_by(BillableEventCorrection.id)
                .limit(INTAKE_BATCH)
            )
            query = self._scoped(query, BillableEventCorrection.organization_id)
            with self.sessions() as session:
                ids = list(session.scalars(query))
            if not ids:
                return
            for row_id in ids:
                try:
                    self._take(row_id)
                except TransientStripeError:  # Stripe could not say: the next pass asks again
                    return
                except PermanentStripeError as error:
                    # About the key: stop. About this row's organization (its subscription):
                    # the row waits, pending, and the others go on.
                    self._stop_if_run(error)
                    if self.stops.run.is_set():
                        return
            after = ids[-1]

    def _take(self, row_id: int) -> None:
        now = self.clock()
        with self.sessions() as session:
            row = session.get(BillableEventCorrection, row_id)
            if row is None or row.usage_correction_id or row.rejected_reason:
                return
            organization_id, event_type = row.organization_id, row.event_type
        meter = self._meter(event_type)
        refresh_stale_period(self.sessions, self.gateway, organization_id, now)
        with self.sessions.begin() as session:
            row = session.scalar(
                sa.select(BillableEventCorrection)
                .where(BillableEventCorrection.id == row_id, pending_correction())
                .with_for_update(skip_locked=True)
            )
            if row is None:
                return  # another pass has it
            try:
                correction, _ = record_in(session, self.settings, upstream_request(row), meter, now)
            except CorrectionError as error:
                row.rejected_reason, row.taken_at = str(error), now
                log.warning(
                    logs.USAGE_CORRECTION_REJECTED,
                    extra={
                        "upstream_id": row.id,
                        "organization_id": row.organization_id,
                        "event_type": row.event_type,
                        "hour": row.hour.isoformat(),
                        "idempotency_key": row.idempotency_key,
                        "error": str(error),
                    },
                )
                return
            row.usage_correction_id, row.taken_at = correction.id, now

    # 2. Plan --------------------------------------------------------------------------------

    def plan_requested(self) -> None:
        query = self._scoped(
            sa.select(UsageCorrection.id).where(UsageCorrection.status == REQUESTED),
            UsageCorrection.organization_id,
        )
        with self.sessions() as session:
            ids = list(session.scalars(query.order_by(UsageCorrection.id)))
        for correction_id in ids:
            if self.stops.run.is_set():
                return
            try:
                self.plan(correction_id)
            except TransientStripeError:
                continue  # stays requested for the next pass
            except PermanentStripeError as error:
                self._stop_if_run(error)
                if not self.stops.run.is_set():  # Stripe refused what the plan needs
                    self._fail(correction_id, str(error))

    def plan(self, correction_id: int) -> None:
        """Decide the method as of now and make its first move, in one transaction."""
        now = self.clock()
        with self.sessions() as session:
            correction = session.get(UsageCorrection, correction_id)
            if correction is None or correction.status != REQUESTED:
                return
            organization_id, event_type, hour = (
                correction.organization_id,
                correction.event_type,
                correction.hour,
            )
            retracting = correction.delta < 0
            account = session.get(BillingAccount, organization_id)
            customer = account.stripe_customer_id if account else None
        if self._stopped(event_type, customer):
            return
        # Stripe first, outside the transaction: the period (when the stored one has ended),
        # and for an invoiced hour the price a credit is given at.
        refresh_stale_period(self.sessions, self.gateway, organization_id, now)
        price: CreditPrice | None = None
        with self.sessions() as session:
            account = session.get(BillingAccount, organization_id)
            invoiced = account is not None and Period(
                account.current_period_start, account.current_period_end
            ).invoiced(hour)
            if invoiced and retracting and account is not None:
                try:
                    price = credit_price(self.gateway, self.settings, account, event_type)
                except CorrectionError as error:
                    self._fail(correction_id, str(error))
                    return
        applied: Applied | None = None
        with self.sessions.begin() as session:
            lock_organization(session, organization_id)
            correction = locked(session, correction_id, REQUESTED)
            account = session.get(BillingAccount, organization_id)
            if correction is None or account is None or not account.stripe_customer_id:
                return
            request = request_of(correction)
            period = Period(account.current_period_start, account.current_period_end)
            try:
                refuse_unplannable(request, period)
            except CorrectionError as error:
                self._set_failed(session, correction, str(error), now)
                return
            targets = cancel_targets(session, self.settings, request, now)
            method = choose_method(period, hour, targets)
            correction.method = method.value
            correction.updated_at = now
            if method == CorrectionMethod.CREDIT:
                if price is None:
                    return  # the period moved since it was read: plan again next pass
                try:
                    self._credit(session, correction, price, now)
                except CorrectionError as error:
                    self._set_failed(session, correction, str(error), now)
                    return
                applied = Applied.of(correction)
            elif method == CorrectionMethod.CANCEL_RESTATE:
                changed = session.execute(
                    sa.update(UsageSubmission)
                    .where(
                        UsageSubmission.id.in_([t.submission_id for t in targets]),
                        UsageSubmission.status == SubmissionStatus.SENT.value,
                    )
                    .values(status=SubmissionStatus.CANCELLING.value, updated_at=now)
                    .execution_options(synchronize_session=False)
                ).rowcount
                if changed != len(targets):  # read under the organization's lock: cannot be
                    raise RuntimeError(f"{len(targets)} cancel targets but {changed} changed")
                session.add_all(
                    UsageCorrectionCancel(
                        correction_id=correction.id,
                        submission_id=t.submission_id,
                        event_name=t.event_name,
                        identifier=t.identifier,
                        value=t.value,
                        status=CancelStatus.REQUESTED.value,
                        attempts=0,
                        created_at=now,
                        updated_at=now,
                    )
                    for t in targets
                )
                correction.status = CANCELLING
            else:
                stamp = hour if hour > now - MAX_EVENT_AGE + HOUR else floor_hour(now)
                row = self._add_row(session, correction, account, correction.delta, stamp, now)
                correction.submission_id, correction.status = row.id, SENDING
                self._to_send.append(row.id)
        if applied is not None:
            self._applied(applied)

    def _credit(
        self, session: Session, correction: UsageCorrection, price: CreditPrice, now: datetime
    ) -> None:
        """Retracted units at the subscription's per-unit price, off the next invoice (0 cents:
        nothing to give back, applied with no credit)."""
        cents = price.cents(-correction.delta)
        check_credit_cents(cents)
        if cents:
            credit = BillingAdjustment(
                organization_id=correction.organization_id,
                kind=AdjustmentKind.CREDIT.value,
                amount_cents=cents,
                currency=price.currency,
                created_at=now,
            )
            session.add(credit)
            session.flush()
            correction.billing_adjustment_id = credit.id
        correction.status, correction.applied_at = APPLIED, now

    def _add_row(
        self,
        session: Session,
        correction: UsageCorrection,
        account: BillingAccount,
        value: int,
        stamp: datetime,
        now: datetime,
    ) -> UsageSubmission:
        """The correction's own outbox row: a meter event under a new identifier, sent (and
        repaired after a crash) like every other."""
        assert account.stripe_customer_id
        row = UsageSubmission(
            organization_id=correction.organization_id,
            stripe_customer_id=account.stripe_customer_id,
            event_type=correction.event_type,
            event_name=self.settings.stripe_meters[correction.event_type],
            value=value,
            event_count=0,
            window_start=stamp,
            window_end=stamp + HOUR,
            identifier=usage_identifier(
                correction.organization_id, correction.event_type, stamp, uuid.uuid4().hex[:12]
            ),
            status=SubmissionStatus.PENDING.value,
            attempts=0,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        session.flush()
        return row

    # 3. Cancel ------------------------------------------------------------------------------

    def cancel(self) -> None:
        query = self._scoped(
            sa.select(
                UsageCorrectionCancel.id,
                UsageCorrection.event_type,
                UsageSubmission.stripe_customer_id,
            )
            .join(UsageCorrection, UsageCorrection.id == UsageCorrectionCancel.correction_id)
            .join(UsageSubmission, UsageSubmission.id == UsageCorrectionCancel.submission_id)
            .where(
                UsageCorrectionCancel.status == CancelStatus.REQUESTED.value,
                UsageCorrection.status == CANCELLING,
            )
            .order_by(UsageCorrectionCancel.id),
            UsageCorrection.organization_id,
        )
        with self.sessions() as session:
            pending = list(session.execute(query))
        for cancel_id, event_type, customer in pending:
            if not self._stopped(event_type, customer):
                self._cancel_one(cancel_id)

    def _cancel_one(self, cancel_id: int) -> None:
        now = self.clock()
        # The attempt is recorded before the call: after a crash, a refusal is told apart from a
        # success whose answer was lost by how long ago the first attempt was (REPLAY_WINDOW).
        with self.sessions.begin() as session:
            cancel = session.scalar(
                sa.select(UsageCorrectionCancel)
                .where(
                    UsageCorrectionCancel.id == cancel_id,
                    UsageCorrectionCancel.status == CancelStatus.REQUESTED.value,
                )
                .with_for_update(skip_locked=True)
            )
            if cancel is None:
                return
            first_attempt = cancel.first_attempt_at
            cancel.attempts += 1
            cancel.first_attempt_at = first_attempt or now
            cancel.last_attempt_at = cancel.updated_at = now
            event_name, identifier, key = (
                cancel.event_name,
                cancel.identifier,
                cancel.idempotency_key,
            )
        try:
            self._call(lambda: self.gateway.cancel_meter_event(event_name, identifier, key))
        except TransientStripeError as error:
            self._note(cancel_id, str(error))  # still requested: the next pass asks again
            return
        except PermanentStripeError as error:
            if error.scope != ErrorScope.ROW:  # about the key, the meter or the customer
                self._stop(error, event_name)
                self._note(cancel_id, str(error))
                return
            real = first_attempt is None or first_attempt > now - REPLAY_WINDOW
            self._refused(cancel_id, str(error), now, known=real)
            return
        self._settle(cancel_id, cancelled=True, now=now, note=None)

    def _call(self, call: Callable[[], str]) -> str:
        """Transient errors retried within the row's share of the run's calls, as meter events."""
        retrying = Retrying(
            stop=stop_after_attempt(max(1, self.submitter.call_attempts))
            | stop_when_event_set(self.stops.run),
            wait=retry_policy.call_wait(self.settings),
            retry=retry_if_exception_type(TransientStripeError),
            reraise=True,
        )
        return retrying(call)

    def _stop(self, error: PermanentStripeError, event_name: str) -> None:
        if error.scope == ErrorScope.RUN:
            self.stops.stop_run(str(error))
        elif error.scope == ErrorScope.METER:
            self.stops.stop_meter(event_name, str(error))

    def _stop_if_run(self, error: StripeGatewayError) -> None:
        if not error.transient and error.scope == ErrorScope.RUN:
            self.stops.stop_run(str(error))

    def _note(self, cancel_id: int, error: str) -> None:
        with self.sessions.begin() as session:
            session.execute(
                sa.update(UsageCorrectionCancel)
                .where(UsageCorrectionCancel.id == cancel_id)
                .values(last_error=error)
            )

    def _refused(self, cancel_id: int, error: str, now: datetime, *, known: bool) -> None:
        """A refusal inside the replay window is real: the event stays billed and the restated
        row carries the whole delta. Past it, the first attempt may have cancelled: held."""
        if known:
            self._settle(cancel_id, cancelled=False, now=now, note=error)
            return
        with self.sessions.begin() as session:
            cancel = session.get(UsageCorrectionCancel, cancel_id, with_for_update=True)
            assert cancel is not None
            if cancel.status != CancelStatus.REQUESTED:
                return
            cancel.status, cancel.last_error, cancel.updated_at = (
                CancelStatus.UNKNOWN.value,
                error,
                now,
            )
            session.execute(
                sa.update(UsageCorrection)
                .where(
                    UsageCorrection.id == cancel.correction_id,
                    UsageCorrection.status == CANCELLING,
                )
                .values(status=HELD, last_error=error, updated_at=now)
            )
            fields = {"correction_id": cancel.correction_id, "identifier": cancel.identifier}
        log.error(logs.USAGE_CORRECTION_HELD, extra={**fields, "error": error})

    def _settle(self, cancel_id: int, *, cancelled: bool, now: datetime, note: str | None) -> None:
        with self.sessions.begin() as session:
            cancel = session.get(UsageCorrectionCancel, cancel_id, with_for_update=True)
            assert cancel is not None
            if cancel.status != CancelStatus.REQUESTED:
                return
            settle_cancel(session, cancel, cancelled=cancelled, now=now, note=note)
            fields = {"correction_id": cancel.correction_id, "identifier": cancel.identifier}
        if not cancelled:
            log.warning(logs.USAGE_CORRECTION_CANCEL_REFUSED, extra={**fields, "error": note})

    # 4. Release -----------------------------------------------------------------------------

    def release(self) -> list[int]:
        """Corrections whose cancels are all answered write their restated row (or are done
        when Σ cancelled + delta is 0); the new outbox rows' ids."""
        open_cancels = sa.exists().where(
            UsageCorrectionCancel.correction_id == UsageCorrection.id,
            UsageCorrectionCancel.status.in_(OPEN_CANCELS),
        )
        query = self._scoped(
            sa.select(UsageCorrection.id).where(
                UsageCorrection.status == CANCELLING, ~open_cancels
            ),
            UsageCorrection.organization_id,
        )
        with self.sessions() as session:
            ids = list(session.scalars(query.order_by(UsageCorrection.id)))
        rows: list[int] = []
        for correction_id in ids:
            row_id = self._release(correction_id)
            if row_id is not None:
                rows.append(row_id)
        return rows

    def _release(self, correction_id: int) -> int | None:
        now = self.clock()
        applied: Applied | None = None
        with self.sessions.begin() as session:
            correction = locked(session, correction_id, CANCELLING)
            if correction is None:
                return None
            cancels = list(
                session.scalars(
                    sa.select(UsageCorrectionCancel).where(
                        UsageCorrectionCancel.correction_id == correction_id
                    )
                )
            )
            if any(c.status in OPEN_CANCELS for c in cancels):
                return None
            value = correction.delta + sum(
                c.value for c in cancels if c.status == CancelStatus.CANCELLED
            )
            account = session.get(BillingAccount, correction.organization_id)
            correction.updated_at = now
            if value and account is not None and account.stripe_customer_id:
                row = self._add_row(session, correction, account, value, correction.hour, now)
                correction.submission_id, correction.status = row.id, SENDING
                return row.id
            if value:
                self._set_failed(
                    session, correction, "the organization has no Stripe customer", now
                )
                return None
            correction.status, correction.applied_at = APPLIED, now
            applied = Applied.of(correction)
        self._applied(applied)
        return None

    # 5. Finish ------------------------------------------------------------------------------

    def finish(self) -> None:
        """A correction whose row Stripe took is applied; one whose row was written off is not."""
        query = self._scoped(
            sa.select(UsageCorrection.id, UsageSubmission.status)
            .join(UsageSubmission, UsageSubmission.id == UsageCorrection.submission_id)
            .where(
                UsageCorrection.status == SENDING,
                UsageSubmission.status.in_(
                    (SubmissionStatus.SENT.value, SubmissionStatus.WRITTEN_OFF.value)
                ),
            ),
            UsageCorrection.organization_id,
        )
        with self.sessions() as session:
            done = list(session.execute(query))
        now = self.clock()
        for correction_id, row_status in done:
            applied: Applied | None = None
            with self.sessions.begin() as session:
                correction = locked(session, correction_id, SENDING)
                if correction is None:
                    continue
                if row_status == SubmissionStatus.WRITTEN_OFF:
                    self._set_failed(session, correction, "its outbox row was written off", now)
                    continue
                correction.status, correction.applied_at, correction.updated_at = APPLIED, now, now
                applied = Applied.of(correction)
            self._applied(applied)

    # Reporting ------------------------------------------------------------------------------

    def count(self) -> None:
        query = self._scoped(
            sa.select(UsageCorrection.status, sa.func.count())
            .where(UsageCorrection.status.in_((REQUESTED, CANCELLING, SENDING, HELD)))
            .group_by(UsageCorrection.status),
            UsageCorrection.organization_id,
        )
        with self.sessions() as session:
            counts = {status: int(n) for status, n in session.execute(query)}
        self.result.corrections_held = counts.pop(HELD, 0)
        self.result.corrections_waiting = sum(counts.values())

    def _applied(self, applied: Applied) -> None:
        self.result.corrections_applied += 1
        metrics.observe_correction_applied(applied.method)
        log.info(
            logs.USAGE_CORRECTION_APPLIED,
            extra={
                "organization_id": applied.organization_id,
                "event_type": applied.event_type,
                "hour": applied.hour.isoformat(),
                "delta": applied.delta,
                "method": applied.method,
                "correction_id": applied.correction_id,
                "idempotency_key": applied.idempotency_key,
                "billed_before": applied.billed_before,
            },
        )

    def _fail(self, correction_id: int, error: str) -> None:
        now = self.clock()
        with self.sessions.begin() as session:
            correction = locked(session, correction_id, REQUESTED)
            if correction is not None:
                self._set_failed(session, correction, error, now)

    @staticmethod
    def _set_failed(
        session: Session, correction: UsageCorrection, error: str, now: datetime
    ) -> None:
        correction.status, correction.last_error, correction.updated_at = FAILED, error, now
        log.error(
            logs.USAGE_CORRECTION_FAILED,
            extra={
                "correction_id": correction.id,
                "organization_id": correction.organization_id,
                "event_type": correction.event_type,
                "hour": correction.hour.isoformat(),
                "delta": correction.delta,
                "error": error,
            },
        )


def locked(session: Session, correction_id: int, status: str) -> UsageCorrection | None:
    """The correction, row-locked, if it is still in `status` and no other pass holds it."""
    return session.scalar(
        sa.select(UsageCorrection)
        .where(UsageCorrection.id == correction_id, UsageCorrection.status == status)
        .with_for_update(skip_locked=True)
    )


def settle_cancel(
    session: Session,
    cancel: UsageCorrectionCancel,
    *,
    cancelled: bool,
    now: datetime,
    note: str | None,
) -> None:
    """Record a cancel's outcome, and its outbox row's: `cancelled`, or back to `sent`."""
    if cancelled:
        cancel.status, cancel.cancelled_at = CancelStatus.CANCELLED.value, now
    else:
        cancel.status = CancelStatus.REFUSED.value
    cancel.last_error, cancel.updated_at = note, now
    status = SubmissionStatus.CANCELLED if cancelled else SubmissionStatus.SENT
    session.execute(
        sa.update(UsageSubmission)
        .where(
            UsageSubmission.id == cancel.submission_id,
            UsageSubmission.status == SubmissionStatus.CANCELLING.value,
        )
        .values(status=status.value, updated_at=now)
    )


def upstream_request(row: BillableEventCorrection) -> CorrectionRequest:
    """An upstream row as a correction request; a delta that is not a whole number is refused."""
    delta = Decimal(str(row.delta))
    if delta != delta.to_integral_value():
        raise CorrectionError(f"delta {delta} is not a whole number")
    return CorrectionRequest(
        organization_id=row.organization_id,
        event_type=row.event_type,
        hour=row.hour,
        delta=int(delta),
        reason=row.reason or "",
        actor=f"upstream:{row.source or 'unknown'}",
        # The upstream key's uniqueness is the producer's idempotency; the row is the correction.
        idempotency_key=f"{UPSTREAM_KEY_PREFIX}{row.id}",
        source=CorrectionSource.UPSTREAM.value,
    )


def request_of(correction: UsageCorrection) -> CorrectionRequest:
    return CorrectionRequest(
        organization_id=correction.organization_id,
        event_type=correction.event_type,
        hour=correction.hour,
        delta=correction.delta,
        reason=correction.reason,
        actor=correction.actor,
        idempotency_key=correction.idempotency_key,
        source=correction.source,
    )


def floor_hour(value: datetime) -> datetime:
    return value.replace(minute=0, second=0, microsecond=0)


# Held corrections ------------------------------------------------------------------------------


def held_corrections(session: Session) -> list[tuple[int, list[int]]]:
    """[(correction id, the outbox rows whose cancel's outcome is unknown)] for reconciliation:
    Stripe's hour = sent → they were cancelled; = sent + their values → they were not."""
    query = (
        sa.select(UsageCorrectionCancel.correction_id, UsageCorrectionCancel.submission_id)
        .join(UsageCorrection, UsageCorrection.id == UsageCorrectionCancel.correction_id)
        .where(
            UsageCorrection.status == HELD,
            UsageCorrectionCancel.status == CancelStatus.UNKNOWN.value,
        )
        .order_by(UsageCorrectionCancel.correction_id, UsageCorrectionCancel.submission_id)
    )
    found: dict[int, list[int]] = {}
    for correction_id, submission_id in session.execute(query):
        found.setdefault(correction_id, []).append(submission_id)
    return list(found.items())


def settle_held_correction(
    runtime: Runtime, correction_id: int, *, cancelled: bool, actor: str, reason: str
) -> dict[str, Any]:
    """Say what became of a held correction's cancels (reconciliation or an operator read
    Stripe's summaries): they were cancelled, or not. The correction goes back to `cancelling`
    and the next flush writes its restated row."""
    if not reason.strip():
        raise CorrectionError("settling a held correction needs a reason (--reason TEXT)")
    now = utcnow()
    note = (
        f"settled by {actor} as {'cancelled' if cancelled else 'not cancelled'}: {reason.strip()}"
    )
    with runtime.session_factory.begin() as session:
        correction = session.get(UsageCorrection, correction_id, with_for_update=True)
        if correction is None:
            raise CorrectionError(f"usage correction {correction_id} does not exist")
        if correction.status != HELD:
            raise CorrectionError(
                f"usage correction {correction_id} is {correction.status}, not held: nothing to "
                "settle"
            )
        unknown = list(
            session.scalars(
                sa.select(UsageCorrectionCancel).where(
                    UsageCorrectionCancel.correction_id == correction_id,
                    UsageCorrectionCancel.status == CancelStatus.UNKNOWN.value,
                )
            )
        )
        for cancel in unknown:
            settle_cancel(session, cancel, cancelled=cancelled, now=now, note=note)
        correction.status, correction.last_error, correction.updated_at = CANCELLING, note, now
        return {
            "id": correction.id,
            "status": correction.status,
            "settled": [c.submission_id for c in unknown],
            "cancelled": cancelled,
            "actor": actor,
            "reason": reason.strip(),
            "next": "the next flush sends the corrected total",
        }
