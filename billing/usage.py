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
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from billing import logs
from billing.config import Settings
from billing.models import BillableEvent, BillingAccount, SubmissionStatus, UsageSubmission, utcnow
from billing.stripe_gateway import (
    MeterEvent,
    MeterEventOutcome,
    PermanentStripeError,
    StripeGateway,
    TransientStripeError,
)

log = logs.get_logger("billing.usage")

# Stripe accepts meter event timestamps up to 35 days old; claim only what is younger than 34
# days so that a re-send inside the 23-hour window still lands inside Stripe's limit.
MAX_EVENT_AGE = timedelta(days=34)
HOUR = timedelta(hours=1)
# Per call: 429 (`rate_limit`, `lock_timeout`) is not retried by stripe-python, so we do it here.
CALL_ATTEMPTS = 5


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
    billed_value: dict[str, int] = field(default_factory=dict)
    unbillable: dict[str, int] = field(default_factory=dict)
    contract_failures: list[dict[str, Any]] = field(default_factory=list)
    last_error: str | None = None
    lock_lost: bool = False
    duration_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """False when the run was blocked, left work pending, or Stripe refused something."""
        return not (
            self.blocked or self.submissions_pending or self.submissions_failed or self.lock_lost
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def raise_if_transient(self) -> FlushResult:
        if self.submissions_pending or self.lock_lost:
            raise TransientFlushError(self)
        return self


@dataclass(frozen=True)
class ClaimedBatch:
    events: int
    submission_ids: list[int]


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
    ) -> None:
        self.settings = settings
        self.sessions = session_factory
        self.gateway = gateway
        self.organization_id = organization_id
        self.clock = clock
        self.lost_lock = lost_lock
        self.on_progress = on_progress
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
        self.result.lock_lost = self.lost_lock()
        self.result.duration_seconds = round(time.monotonic() - started, 3)
        if not self.result.events_claimed and not self._sent_anything():
            log.info(logs.FLUSH_NO_PENDING, extra={**fields, "unbillable": self.result.unbillable})
        log.info(logs.FLUSH_COMPLETED, extra={**fields, **self._summary_fields()})
        return self.result

    def _should_stop(self) -> bool:
        # Losing the lock means another flush may be running: stop claiming (it is still safe).
        return self.lost_lock()

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
            "billed_value": r.billed_value,
            "unbillable": r.unbillable,
            "duration_ms": int(r.duration_seconds * 1000),
        }

    # Claiming ---------------------------------------------------------------------------------

    def _billable_filter(self, now: datetime) -> list[sa.ColumnElement[bool]]:
        event = BillableEvent
        conditions = [
            event.usage_submission_id.is_(None),
            event.quantity > 0,
            event.occurred_at <= now,
            event.occurred_at > now - MAX_EVENT_AGE,
            event.event_type.in_(sorted(self.settings.stripe_meters)),
            BillingAccount.stripe_customer_id.is_not(None),
        ]
        if self.organization_id is not None:
            conditions.append(event.organization_id == self.organization_id)
        return conditions

    def _claim_batch(self) -> ClaimedBatch | None:
        """Claim up to one batch of events into outbox rows, in one transaction."""
        if not self.settings.stripe_meters:
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
        lanes: dict[tuple[str, str], list[UsageSubmission]] = defaultdict(list)
        for row in rows:
            lanes[(row.stripe_customer_id, row.event_name)].append(row)
        workers = min(self.settings.submit_concurrency, len(lanes))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="meter-submit") as pool:
            # carry_context: the lanes' log lines keep the task_id/task_name bound by the caller.
            submit_lane = logs.carry_context(self._submit_lane)
            outcomes = [o for lane in pool.map(submit_lane, lanes.values()) for o in lane]
        self._record(outcomes)

    def _submit_lane(
        self, rows: Iterable[UsageSubmission]
    ) -> list[tuple[UsageSubmission, str, str | None]]:
        return [self._submit_one(row) for row in rows]

    def _submit_one(self, row: UsageSubmission) -> tuple[UsageSubmission, str, str | None]:
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
                logs.METER_SUBMIT_FAILED, extra={**fields, "error": str(error), "transient": False}
            )
            return row, SubmissionStatus.FAILED.value, str(error)
        except TransientStripeError as error:
            log.warning(
                logs.METER_SUBMIT_FAILED, extra={**fields, "error": str(error), "transient": True}
            )
            return row, SubmissionStatus.PENDING.value, str(error)
        log.info(logs.METER_SUBMIT_SUCCEEDED, extra={**fields, "outcome": outcome.value})
        return row, outcome.value, None

    def _call_retrying(self, send: Callable[[], MeterEventOutcome]) -> MeterEventOutcome:
        base = self.settings.retry_backoff_seconds
        retrying = Retrying(
            stop=stop_after_attempt(CALL_ATTEMPTS),
            wait=wait_exponential_jitter(
                multiplier=base / 4, max=max(base * 8, 0.001), jitter=base / 4
            ),
            retry=retry_if_exception(_is_rate_limited),
            reraise=True,
        )
        return retrying(send)

    def _record(self, outcomes: list[tuple[UsageSubmission, str, str | None]]) -> None:
        now = self.clock()
        updates: list[dict[str, Any]] = []
        for row, outcome, error in outcomes:
            delivered = outcome in (MeterEventOutcome.ACCEPTED, MeterEventOutcome.DUPLICATE)
            status = SubmissionStatus.SENT.value if delivered else outcome
            updates.append(
                {
                    "id": row.id,
                    "status": status,
                    "attempts": row.attempts + 1,
                    "last_error": error,
                    "sent_at": now if delivered else None,
                    "updated_at": now,
                }
            )
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
        with self.sessions.begin() as session:
            session.execute(sa.update(UsageSubmission), updates)

    # Reporting --------------------------------------------------------------------------------

    def _count_unbillable(self) -> None:
        """Unclaimed rows that this flush could not bill, by reason. Nothing is dropped."""
        now = self.clock()
        event = BillableEvent
        meters = sorted(self.settings.stripe_meters)
        reason = sa.case(
            (event.quantity <= 0, UnbillableReason.INVALID_QUANTITY),
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


def _is_rate_limited(error: BaseException) -> bool:
    return isinstance(error, TransientStripeError) and error.status == 429


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
) -> FlushResult:
    """One flush pass (no lock): the service function every entry point ends in."""
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
    )
    result = flush.run()
    result.contract_failures = failures
    return result
