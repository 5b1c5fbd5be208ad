"""The hourly usage flush: claim → aggregate → outbox → submit.

Exactly once, whatever crashes:
- Claiming is one transaction per batch: lock unclaimed rows (`FOR UPDATE SKIP LOCKED`), aggregate
  them per (organization, event type, hour) in SQL, write one outbox row (`usage_submissions`) per
  group with a fixed Stripe `identifier`, and point the rows at it. Either all of that commits or
  none of it does.
- Submitting sends each pending outbox row with its identifier and an idempotency key derived from
  it. A crash after Stripe accepted but before we recorded it is repaired by the next flush: the
  re-send is answered "An event already exists with identifier …", which means delivered.
- Stripe keeps identifiers for at least 24 hours only, so a row unsent for longer is held for
  reconciliation instead of re-sent blindly.
- Only an error about one request fails its row. An error about the account (key, permissions),
  a meter or a customer stops sending for what it is about and leaves those rows pending, so the
  next flush after the fix bills them once (`stripe_gateway.ErrorScope`).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_when_event_set

from billing import logs, retry_policy
from billing.config import Settings
from billing.models import BillableEvent, BillingAccount, SubmissionStatus, UsageSubmission, utcnow
from billing.stripe_gateway import (
    ErrorScope,
    MeterEvent,
    MeterEventOutcome,
    PermanentStripeError,
    StripeGateway,
    StripeGatewayError,
    TransientStripeError,
)

log = logs.get_logger("billing.usage")

# Stripe accepts meter event timestamps up to 35 days old; claim only what is younger than 34
# days so that a re-send inside the 23-hour window still lands inside Stripe's limit.
MAX_EVENT_AGE = timedelta(days=34)
HOUR = timedelta(hours=1)
# Outcomes of a row that is left pending because an error about more than the row stopped it:
STOPPED = "stopped"  # this row's call got the error
SKIPPED = "skipped"  # not sent: an earlier row's error already covers it
AWAITING_OPERATOR = (SubmissionStatus.FAILED.value, SubmissionStatus.HELD.value)


def whole_positive_quantity(quantity: Any) -> sa.ColumnElement[bool]:
    """A quantity that is a meter event value: a whole number > 0. A `numeric` column may hold
    0.4 or 1.5; summing and truncating those would bill usage that never happened."""
    return sa.and_(quantity > 0, quantity == sa.cast(quantity, sa.BigInteger))


class UnbillableReason:
    INVALID_QUANTITY = "invalid_quantity"
    FUTURE = "future"
    TOO_OLD = "too_old"
    NO_METER = "no_meter"
    NO_CUSTOMER = "no_customer"


class TransientFlushError(RuntimeError):
    """The flush left submissions pending after transient Stripe errors: run it again."""

    def __init__(self, result: FlushResult) -> None:
        super().__init__(
            f"{result.submissions_pending} usage submission(s) still pending after transient "
            f"Stripe errors: {result.last_error}"
        )
        self.result = result


@dataclass
class FlushResult:
    enabled: bool = True
    skipped: bool = False
    blocked: bool = False
    events_claimed: int = 0
    batches: int = 0
    submissions_sent: int = 0
    submissions_already_delivered: int = 0
    submissions_failed: int = 0
    submissions_pending: int = 0
    submissions_held: int = 0
    # Left pending because an error about the account, a meter or a customer stopped them.
    submissions_stopped: int = 0
    stop_error: str | None = None  # the account-level error that stopped the whole run
    stopped_meters: dict[str, str] = field(default_factory=dict)  # event name -> error
    stopped_customers: dict[str, str] = field(default_factory=dict)  # customer id -> error
    # Current counts (this run's scope), not only what this run touched: they wait for an operator.
    awaiting_operator: dict[str, int] = field(default_factory=dict)
    billed_value: dict[str, int] = field(default_factory=dict)
    unbillable: dict[str, int] = field(default_factory=dict)
    contract_failures: list[dict[str, Any]] = field(default_factory=list)
    last_error: str | None = None
    lock_lost: bool = False
    duration_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """False when the run was blocked or stopped, left work pending, Stripe refused something,
        or failed or held rows wait for an operator (from any run)."""
        return not (
            self.blocked
            or self.submissions_pending
            or self.submissions_failed
            or self.submissions_stopped
            or self.stop_error
            or self.lock_lost
            or any(self.awaiting_operator.values())
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def raise_if_transient(self) -> FlushResult:
        """Another pass may finish the work, unless the account itself was refused."""
        if (self.submissions_pending or self.lock_lost) and not self.stop_error:
            raise TransientFlushError(self)
        return self


@dataclass(frozen=True)
class ClaimedBatch:
    events: int
    submission_ids: list[int]


class Stops:
    """What errors about more than one row have stopped, shared by the submit lanes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.run = threading.Event()  # set: every lane stops at once
        self.run_error: str | None = None
        self.meters: dict[str, str] = {}
        self.customers: dict[str, str] = {}

    def stop(self, error: StripeGatewayError, row: UsageSubmission) -> None:
        with self._lock:
            if error.scope == ErrorScope.RUN:
                self.run_error = self.run_error or str(error)
                self.run.set()
            elif error.scope == ErrorScope.METER:
                self.meters.setdefault(row.event_name, str(error))
            elif error.scope == ErrorScope.CUSTOMER:
                self.customers.setdefault(row.stripe_customer_id, str(error))

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


class UsageFlush:
    """One flush run; tasks and CLI commands reach it through `flush_usage`."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        gateway: StripeGateway,
        *,
        organization_id: int | None = None,
        clock: Callable[[], datetime] = utcnow,
        lost_lock: Callable[[], bool] = lambda: False,
        on_progress: Callable[[FlushResult], None] | None = None,
        call_attempts: int = retry_policy.CALLS_PER_ROW_PER_RUN,
    ) -> None:
        self.settings = settings
        self.sessions = session_factory
        self.gateway = gateway
        self.organization_id = organization_id
        self.clock = clock
        self.lost_lock = lost_lock
        self.on_progress = on_progress
        self.call_attempts = call_attempts
        self.stops = Stops()
        self.result = FlushResult()
        self._cursor: tuple[Any, ...] | None = None  # group-order key of the last claimed row

    # The pass ---------------------------------------------------------------------------------

    def run(self) -> FlushResult:
        started = time.monotonic()
        fields = self._scope_fields()
        log.info(logs.FLUSH_STARTED, extra=fields)
        self._hold_stale_submissions()
        pending = self._pending_submission_ids()  # left by an earlier run: re-send first
        page = self.settings.flush_batch_size
        for start in range(0, len(pending), page):
            if self.stops.run.is_set():
                break
            self._submit(pending[start : start + page])
        while not self._should_stop():
            batch = self._claim_batch()
            if batch is None:
                break
            self.result.batches += 1
            batch_fields = {
                **fields,
                "batch": self.result.batches,
                "events": batch.events,
                "submissions": len(batch.submission_ids),
            }
            log.info(logs.FLUSH_BATCH_STARTED, extra=batch_fields)
            self.result.events_claimed += batch.events
            self._submit(batch.submission_ids)
            log.info(logs.FLUSH_BATCH_COMPLETED, extra=batch_fields)
            if self.on_progress:
                self.on_progress(self.result)
        self._count_unbillable()
        self._report_stops()
        self._count_awaiting_operator()
        self.result.lock_lost = self.lost_lock()
        self.result.duration_seconds = round(time.monotonic() - started, 3)
        if not self.result.events_claimed and not self._sent_anything():
            log.info(logs.FLUSH_NO_PENDING, extra={**fields, "unbillable": self.result.unbillable})
        log.info(logs.FLUSH_COMPLETED, extra={**fields, **self._summary_fields()})
        return self.result

    def _should_stop(self) -> bool:
        # Losing the lock means another flush may be running: stop claiming (it is still safe).
        return self.stops.run.is_set() or self.lost_lock()

    def _sent_anything(self) -> bool:
        r = self.result
        return bool(r.submissions_sent or r.submissions_failed or r.submissions_pending)

    def _scope_fields(self) -> dict[str, Any]:
        return {} if self.organization_id is None else {"organization_id": self.organization_id}

    def _summary_fields(self) -> dict[str, Any]:
        r = self.result
        return {
            "events_claimed": r.events_claimed,
            "batches": r.batches,
            "submissions_sent": r.submissions_sent,
            "submissions_failed": r.submissions_failed,
            "submissions_pending": r.submissions_pending,
            "submissions_held": r.submissions_held,
            "submissions_stopped": r.submissions_stopped,
            "awaiting_operator": r.awaiting_operator,
            "billed_value": r.billed_value,
            "unbillable": r.unbillable,
            "duration_ms": int(r.duration_seconds * 1000),
        }

    # Claiming ---------------------------------------------------------------------------------

    def _claimable_event_types(self) -> list[str]:
        """Mapped event types whose meter no error has stopped in this run."""
        stopped = self.stops.meters
        return sorted(t for t, name in self.settings.stripe_meters.items() if name not in stopped)

    def _billable_filter(self, now: datetime) -> list[sa.ColumnElement[bool]]:
        event = BillableEvent
        conditions = [
            event.usage_submission_id.is_(None),
            whole_positive_quantity(event.quantity),
            event.occurred_at <= now,
            event.occurred_at > now - MAX_EVENT_AGE,
            event.event_type.in_(self._claimable_event_types()),
            BillingAccount.stripe_customer_id.is_not(None),
        ]
        if self.stops.customers:
            # Left unclaimed (not parked in the outbox) until the customer is fixed.
            conditions.append(BillingAccount.stripe_customer_id.not_in(sorted(self.stops.customers)))
        if self.organization_id is not None:
            conditions.append(event.organization_id == self.organization_id)
        return conditions

    def _claim_batch(self) -> ClaimedBatch | None:
        """Claim up to one batch of events into outbox rows, in one transaction."""
        if not self._claimable_event_types():
            return None
        now = self.clock()
        event = BillableEvent
        with self.sessions.begin() as session:
            dialect = session.get_bind().dialect.name
            if dialect == "sqlite":
                # SQLite has no row locks: take the write lock up front so two claimers serialise.
                session.execute(sa.text("UPDATE billable_events SET id = id WHERE 0"))
            # Group order keeps each (organization, type, hour) whole inside one batch, except at
            # a batch's edges, so a batch yields few meter events; the cursor continues after the
            # previous batch instead of re-reading rows this run left unbillable.
            order = (event.organization_id, event.event_type, event.occurred_at, event.id)
            pick = (
                sa.select(*order)
                .join(BillingAccount, BillingAccount.organization_id == event.organization_id)
                .where(*self._billable_filter(now))
                .order_by(*order)
                .limit(self.settings.flush_batch_size)
            )
            if self._cursor is not None:
                # Bound with the columns' own types, so timestamps compare as stored.
                after = sa.tuple_(
                    *(
                        sa.bindparam(None, v, type_=c.type)
                        for c, v in zip(order, self._cursor, strict=True)
                    )
                )
                pick = pick.where(sa.tuple_(*order) > after)
            if dialect == "postgresql":
                pick = pick.with_for_update(of=event, skip_locked=True)
            picked = session.execute(pick).all()
            if not picked:
                return None
            self._cursor = tuple(picked[-1])
            ids = [row.id for row in picked]
            groups = session.execute(_group_query(ids, dialect)).all()
            token = uuid.uuid4().hex[:12]
            rows = [self._outbox_row(group, token, now) for group in groups]
            submission_ids = list(
                session.scalars(sa.insert(UsageSubmission).returning(UsageSubmission.id), rows)
            )
            submission = UsageSubmission
            linked = session.execute(
                sa.update(event)
                .where(
                    _id_in(event.id, ids, dialect),
                    event.usage_submission_id.is_(None),
                    _id_in(submission.id, submission_ids, dialect),
                    submission.organization_id == event.organization_id,
                    submission.event_type == event.event_type,
                    event.occurred_at >= submission.window_start,
                    event.occurred_at < submission.window_end,
                )
                .values(usage_submission_id=submission.id, claimed_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
            if linked != len(ids):
                raise RuntimeError(f"claimed {len(ids)} billable events but linked {linked}")
        return ClaimedBatch(events=len(ids), submission_ids=submission_ids)

    def _outbox_row(self, group: Any, token: str, now: datetime) -> dict[str, Any]:
        hour = _as_utc(group.hour)
        window_start, window_end = billing_window(
            hour, group.after_boundary, group.period_start, group.period_end
        )
        return {
            "organization_id": group.organization_id,
            "stripe_customer_id": group.stripe_customer_id,
            "event_type": group.event_type,
            "event_name": self.settings.stripe_meters[group.event_type],
            "value": int(group.value),
            "event_count": int(group.event_count),
            "window_start": window_start,
            "window_end": window_end,
            "identifier": usage_identifier(
                group.organization_id, group.event_type, window_start, token
            ),
            "status": SubmissionStatus.PENDING.value,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
        }

    # Submitting -------------------------------------------------------------------------------

    def _pending_submission_ids(self) -> list[int]:
        query = sa.select(UsageSubmission.id).where(
            UsageSubmission.status == SubmissionStatus.PENDING.value
        )
        if self.organization_id is not None:
            query = query.where(UsageSubmission.organization_id == self.organization_id)
        with self.sessions() as session:
            return list(session.scalars(query.order_by(UsageSubmission.id)))

    def _hold_stale_submissions(self) -> None:
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

    def _submit(self, submission_ids: Sequence[int]) -> None:
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
        workers = min(self.settings.submit_concurrency, len(lanes))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="meter-submit") as pool:
            # carry_context: the lanes' log lines keep the task_id/task_name bound by the caller.
            submit_lane = logs.carry_context(self._submit_lane)
            outcomes = [o for lane in pool.map(submit_lane, lanes.values()) for o in lane]
        self._record(outcomes)

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
        of the run's call budget (`billing.retry_policy`); a run-level stop ends the retries."""
        retrying = Retrying(
            stop=stop_after_attempt(self.call_attempts) | stop_when_event_set(self.stops.run),
            wait=retry_policy.call_wait(self.settings),
            retry=retry_if_exception_type(TransientStripeError),
            reraise=True,
        )
        return retrying(send)

    def _record(self, attempts: list[Attempt]) -> None:
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
            session.execute(sa.update(UsageSubmission), updates)

    # Reporting --------------------------------------------------------------------------------

    def _report_stops(self) -> None:
        stops, result = self.stops, self.result
        result.stop_error = stops.run_error
        result.stopped_meters = dict(stops.meters)
        result.stopped_customers = dict(stops.customers)
        fields = self._scope_fields()
        if stops.run_error:
            log.error(logs.FLUSH_STOPPED, extra={**fields, "error": stops.run_error})
        for event_name, error in stops.meters.items():
            log.error(
                logs.FLUSH_METER_STOPPED, extra={**fields, "event_name": event_name, "error": error}
            )
        for customer, error in stops.customers.items():
            log.error(
                logs.FLUSH_CUSTOMER_STOPPED,
                extra={**fields, "stripe_customer_id": customer, "error": error},
            )

    def _count_awaiting_operator(self) -> None:
        """Failed and held rows from any run stay in every result until an operator acts."""
        query = (
            sa.select(UsageSubmission.status, sa.func.count())
            .where(UsageSubmission.status.in_(AWAITING_OPERATOR))
            .group_by(UsageSubmission.status)
        )
        if self.organization_id is not None:
            query = query.where(UsageSubmission.organization_id == self.organization_id)
        with self.sessions() as session:
            counts = dict.fromkeys(AWAITING_OPERATOR, 0) | {
                status: int(n) for status, n in session.execute(query)
            }
        self.result.awaiting_operator = counts
        if any(counts.values()):
            log.error(logs.FLUSH_AWAITING_OPERATOR, extra={**self._scope_fields(), **counts})

    def _count_unbillable(self) -> None:
        """Unclaimed rows that this flush could not bill, by reason. Nothing is dropped."""
        now = self.clock()
        event = BillableEvent
        meters = sorted(self.settings.stripe_meters)
        reason = sa.case(
            (sa.not_(whole_positive_quantity(event.quantity)), UnbillableReason.INVALID_QUANTITY),
            (event.occurred_at > now, UnbillableReason.FUTURE),
            (event.occurred_at <= now - MAX_EVENT_AGE, UnbillableReason.TOO_OLD),
            (event.event_type.not_in(meters) if meters else sa.true(), UnbillableReason.NO_METER),
            (BillingAccount.stripe_customer_id.is_(None), UnbillableReason.NO_CUSTOMER),
            else_=sa.null(),
        )
        query = (
            sa.select(reason.label("reason"), sa.func.count())
            .select_from(event)
            .outerjoin(BillingAccount, BillingAccount.organization_id == event.organization_id)
            .where(event.usage_submission_id.is_(None))
            .group_by(reason)
        )
        if self.organization_id is not None:
            query = query.where(event.organization_id == self.organization_id)
        with self.sessions() as session:
            counts = {r: int(n) for r, n in session.execute(query) if r is not None}
        self.result.unbillable = counts
        if counts:
            log.warning(logs.FLUSH_UNBILLABLE, extra={**self._scope_fields(), "unbillable": counts})


def _group_query(ids: Sequence[int], dialect: str) -> sa.Select[Any]:
    """Sum the claimed events per (organization, event type, hour), in SQL.

    An hour that holds the account's period boundary is split at it (`after_boundary`), so usage
    on each side is stamped inside its own billing period.
    """
    event, account = BillableEvent, BillingAccount
    hour = _hour_bucket(event.occurred_at, dialect)
    after_boundary = sa.case(
        *(
            (
                sa.and_(_hour_bucket(boundary, dialect) == hour, event.occurred_at >= boundary),
                1,
            )
            for boundary in (account.current_period_start, account.current_period_end)
        ),
        else_=0,
    )
    keys = (
        event.organization_id,
        event.event_type,
        hour.label("hour"),
        after_boundary.label("after_boundary"),
        account.stripe_customer_id,
        account.current_period_start.label("period_start"),
        account.current_period_end.label("period_end"),
    )
    return (
        sa.select(
            *keys,
            sa.func.sum(event.quantity).label("value"),
            sa.func.count().label("event_count"),
        )
        .join(account, account.organization_id == event.organization_id)
        .where(_id_in(event.id, ids, dialect))
        .group_by(*keys)
    )


def billing_window(
    hour: datetime,
    after_boundary: int,
    period_start: datetime | None,
    period_end: datetime | None,
) -> tuple[datetime, datetime]:
    """The [start, end) an outbox row covers: its hour, or the part of it on one side of the
    period boundary inside it. The meter event's timestamp is the start, so it lands in the
    period the usage belongs to."""
    end = hour + HOUR
    for boundary in (period_start, period_end):
        if boundary is not None and hour < boundary < end:
            return (boundary, end) if after_boundary else (hour, boundary)
    return hour, end


def usage_identifier(organization_id: int, event_type: str, start: datetime, token: str) -> str:
    """Stripe's dedupe key for one outbox row: fixed once written, unique across batches.

    The random batch token keeps identifiers unique even if the database is restored or its ids
    restart; a re-used identifier inside Stripe's window would silently drop real usage.
    """
    type_part = "".join(c if c.isalnum() else "-" for c in event_type)[:40]
    return f"{organization_id}-{type_part}-{start:%Y%m%d%H%M}-{token}"[:100]


def _hour_bucket(column: Any, dialect: str) -> Any:
    if dialect == "postgresql":
        return sa.func.date_trunc("hour", column, "UTC")
    return sa.func.strftime("%Y-%m-%d %H:00:00", column)


def _id_in(column: Any, ids: Sequence[int], dialect: str) -> sa.ColumnElement[bool]:
    if dialect == "postgresql":
        # One array parameter instead of thousands of bound values.
        return column == sa.any_(sa.cast(sa.literal(list(ids)), sa.ARRAY(sa.BigInteger)))
    return column.in_(ids)


def _as_utc(value: datetime | str) -> datetime:
    if isinstance(value, str):  # SQLite returns the strftime bucket as text
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def flush_usage(
    settings: Settings,
    session_factory: sessionmaker[Session],
    gateway_factory: Callable[[], StripeGateway],
    *,
    organization_id: int | None = None,
    clock: Callable[[], datetime] = utcnow,
    lost_lock: Callable[[], bool] = lambda: False,
    contract_gate: Callable[[], list[dict[str, Any]]] | None = None,
    on_progress: Callable[[FlushResult], None] | None = None,
    call_attempts: int = retry_policy.CALLS_PER_ROW_PER_RUN,
) -> FlushResult:
    """One flush pass (no lock): the service function every entry point ends in.

    `call_attempts` is this pass's share of the run's calls per row (`billing.retry_policy`)."""
    if not settings.billing_enabled:
        log.info(logs.FLUSH_DISABLED)
        return FlushResult(enabled=False)
    failures = contract_gate() if contract_gate and settings.validate_contract_before_flush else []
    if failures:
        if settings.contract_fail_closed:
            log.error(logs.FLUSH_BLOCKED, extra={"failed_checks": [f["check"] for f in failures]})
            return FlushResult(blocked=True, contract_failures=failures)
        log.warning(
            logs.FLUSH_CONTRACT_WARNING, extra={"failed_checks": [f["check"] for f in failures]}
        )
    flush = UsageFlush(
        settings,
        session_factory,
        gateway_factory(),
        organization_id=organization_id,
        clock=clock,
        lost_lock=lost_lock,
        on_progress=on_progress,
        call_attempts=call_attempts,
    )
    result = flush.run()
    result.contract_failures = failures
    return result
