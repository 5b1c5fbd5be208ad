"""What an operator watches, read from the database and Redis: `flask billing status` and the
scrape-time gauges of `billing.metrics` both come from `read_state`.

The run records (last flush, last contract validation) are in the database, so they are read even
while Redis is down: the lock is then unknown (`lock_error`) and the rest still reported.

Only rows that still need something are counted (pending billable events, outbox rows not
`sent`, webhook rows not `processed`/`ignored`), so the queries follow the backlog, not the
table's history. A billable event an operator dismissed is no longer pending: it leaves the
backlog, the oldest-unbilled age and the unbillable counts at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
import sqlalchemy as sa
from prometheus_client.core import GaugeMetricFamily

from billing import metrics, ops_records
from billing.checks.billability import REASONS, BillableRules, count_unbillable
from billing.errors import error_line
from billing.models import (
    AdjustmentKind,
    BillableEvent,
    BillableEventCorrection,
    CorrectionStatus,
    InvoiceAdjustment,
    InvoiceAdjustmentStatus,
    SubmissionStatus,
    UsageCorrection,
    UsageSubmission,
    WebhookEvent,
    WebhookStatus,
    pending_event,
    utcnow,
)
from billing.runtime import Runtime
from billing.usage.history import FlushHistory, timestamp_of
from billing.usage.lock import LockState, inspect_lock
from billing.usage.reconcile import STATUSES as RECONCILE_STATUSES

# Always reported (as 0 when empty), so an alert's series exists before the first bad row.
OPEN_SUBMISSION_STATUSES = (
    SubmissionStatus.PENDING.value,
    SubmissionStatus.HELD.value,
    SubmissionStatus.FAILED.value,
    SubmissionStatus.REJECTED.value,
)
OPEN_WEBHOOK_STATUSES = (
    WebhookStatus.RECEIVED.value,
    WebhookStatus.PROCESSING.value,
    WebhookStatus.FAILED.value,
)
# A cancelled row (a usage correction) is as finished as a sent one: its correction re-sent it.
DONE_SUBMISSION_STATUSES = (SubmissionStatus.SENT.value, SubmissionStatus.CANCELLED.value)
DONE_WEBHOOK_STATUSES = (WebhookStatus.PROCESSED.value, WebhookStatus.IGNORED.value)


@dataclass(frozen=True)
class OpsState:
    now: datetime
    unclaimed_events: int
    oldest_unclaimed_event_at: datetime | None
    oldest_unbilled_at: datetime | None
    outbox_by_status: dict[str, int]
    webhooks_by_status: dict[str, int]
    # Pending rows the flush sets aside, by reason (`billing.billability`); every reason present.
    unbillable: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    history: FlushHistory = field(default_factory=FlushHistory)
    contract_validation: dict[str, Any] | None = None
    lock: LockState | None = None
    lock_backend: str = "redis"
    lock_error: str | None = None  # Redis did not answer: the lock's state is unknown
    # Minimum-commitment top-ups whose invoice was finalized first: an operator carries them over
    # to the next invoice or waives them (`flask billing adjustments list --missed`).
    missed_adjustments: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # The last scheduled reconciliation (`ops_records.RECONCILE`); None until the first.
    reconcile: dict[str, Any] | None = None
    # Usage corrections by status, every status present, and upstream rows `rejected`.
    usage_corrections: dict[str, int] = field(default_factory=dict)

    @property
    def oldest_unbilled_age_seconds(self) -> float:
        if self.oldest_unbilled_at is None:
            return 0.0
        return max(0.0, (self.now - self.oldest_unbilled_at).total_seconds())

    @property
    def dead_letters(self) -> int:
        return self.webhooks_by_status.get(WebhookStatus.FAILED.value, 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "backlog": {
                "unclaimed_events": self.unclaimed_events,
                "oldest_unclaimed_event_at": _iso(self.oldest_unclaimed_event_at),
                "oldest_unbilled_at": _iso(self.oldest_unbilled_at),
                "oldest_unbilled_age_seconds": round(self.oldest_unbilled_age_seconds, 1),
            },
            "unbillable": self.unbillable,
            "outbox_by_status": self.outbox_by_status,
            "webhooks_by_status": self.webhooks_by_status,
            "dead_letters": self.dead_letters,
            "missed_adjustments": self.missed_adjustments,
            "flush": self.history.to_dict(),
            "contract_validation": self.contract_validation,
            "lock": self._lock_dict(),
            "reconcile": self.reconcile,
            "usage_corrections": self.usage_corrections,
        }

    def _lock_dict(self) -> dict[str, Any]:
        if self.lock_backend != "redis":
            return {"backend": self.lock_backend, "held": None}
        if self.lock_error:
            return {"held": None, "error": self.lock_error}
        return self.lock.to_dict() if self.lock else {"held": False}

    def gauges(self) -> Iterator[GaugeMetricFamily]:
        yield metrics.OLDEST_UNBILLED_EVENT_AGE_SECONDS.family(
            self.oldest_unbilled_age_seconds,
        )
        yield metrics.UNCLAIMED_EVENTS.family(
            self.unclaimed_events,
        )
        yield metrics.UNBILLABLE_EVENTS.family(
            self.unbillable,
        )
        yield metrics.OUTBOX_ROWS.family(
            self.outbox_by_status,
        )
        yield metrics.WEBHOOK_EVENTS.family(
            self.webhooks_by_status,
        )
        yield metrics.WEBHOOK_DEAD_LETTERS.family(
            self.dead_letters,
        )
        yield metrics.INVOICE_ADJUSTMENTS_MISSED.family(
            self.missed_adjustments,
        )
        yield metrics.USAGE_CORRECTIONS.family(
            self.usage_corrections,
        )
        yield from self._history_gauges(self.history)
        yield from self._contract_gauges(self.contract_validation)
        yield from self._reconcile_gauges(self.reconcile)
        if self.lock_backend == "redis" and not self.lock_error:
            held = self.lock.holder.held_seconds(self.now) if self.lock and self.lock.holder else 0
            yield metrics.FLUSH_LOCK_HELD_SECONDS.family(
                held if self.lock else 0,
            )

    @staticmethod
    def _history_gauges(history: FlushHistory) -> Iterator[GaugeMetricFamily]:
        for gauge, entry in (
            (metrics.FLUSH_LAST_RUN_TIMESTAMP_SECONDS, history.last_run),
            (metrics.FLUSH_LAST_SUCCESS_TIMESTAMP_SECONDS, history.last_success),
        ):
            stamp = timestamp_of(entry)
            if stamp is not None:  # absent until the first such run
                yield gauge.family(stamp)
        yield metrics.FLUSH_CONSECUTIVE_LOCK_SKIPS.family(
            history.consecutive_lock_skips,
        )
        yield metrics.FLUSH_CONSECUTIVE_LOCK_UNAVAILABLE.family(
            history.consecutive_lock_unavailable,
        )

    @staticmethod
    def _contract_gauges(validation: dict[str, Any] | None) -> Iterator[GaugeMetricFamily]:
        if validation is None:  # absent until the first validation: unknown is not "passed"
            return
        yield metrics.CONTRACT_LAST_VALIDATION_TIMESTAMP_SECONDS.family(
            timestamp_of(validation) or 0,
        )
        yield metrics.CONTRACT_LAST_VALIDATION_FAILED_CHECKS.family(
            len(validation.get("failed_checks", [])),
        )

    @staticmethod
    def _reconcile_gauges(run: dict[str, Any] | None) -> Iterator[GaugeMetricFamily]:
        if run is None:  # absent until the first run: never run is not "no drift"
            return
        yield metrics.RECONCILE_LAST_RUN_TIMESTAMP_SECONDS.family(timestamp_of(run) or 0)
        yield metrics.RECONCILE_GROUPS.family(
            {status: run.get("groups", {}).get(status, 0) for status in RECONCILE_STATUSES}
        )


def read_state(runtime: Runtime) -> OpsState:
    now = utcnow()
    with runtime.session_factory() as session:
        unclaimed, oldest_unclaimed = session.execute(
            sa.select(sa.func.count(), sa.func.min(BillableEvent.occurred_at)).where(
                pending_event()
            )
        ).one()
        rules = BillableRules.of(runtime.settings, now, session.get_bind().dialect.name)
        unbillable = {**dict.fromkeys(REASONS, 0), **count_unbillable(session, rules)}
        oldest_unsent = session.scalar(
            sa.select(sa.func.min(UsageSubmission.window_start)).where(
                UsageSubmission.status.not_in(DONE_SUBMISSION_STATUSES)
            )
        )
        outbox = _count_by_status(
            session, UsageSubmission.status, DONE_SUBMISSION_STATUSES, OPEN_SUBMISSION_STATUSES
        )
        webhooks = _count_by_status(
            session, WebhookEvent.status, DONE_WEBHOOK_STATUSES, OPEN_WEBHOOK_STATUSES
        )
        corrections = count_corrections(session)
        missed = session.scalar(
            sa.select(sa.func.count()).where(
                InvoiceAdjustment.status == InvoiceAdjustmentStatus.MISSED.value,
                InvoiceAdjustment.kind == AdjustmentKind.MINIMUM_COMMITMENT.value,
            )
        )
    settings = runtime.settings
    history, contract_validation = read_run_records(runtime)
    lock, lock_error = _read_lock(runtime)
    oldest = [t for t in (oldest_unclaimed, oldest_unsent) if t is not None]
    return OpsState(
        now=now,
        unclaimed_events=int(unclaimed),
        oldest_unclaimed_event_at=oldest_unclaimed,
        oldest_unbilled_at=min(oldest) if oldest else None,
        outbox_by_status=outbox,
        unbillable=unbillable,
        webhooks_by_status=webhooks,
        history=history,
        contract_validation=contract_validation,
        lock=lock,
        lock_backend=settings.flush_lock_backend,
        lock_error=lock_error,
        missed_adjustments=int(missed or 0),
        reconcile=read_reconcile_record(runtime),
        usage_corrections=corrections,
    )


def read_run_records(runtime: Runtime) -> tuple[FlushHistory, dict[str, Any] | None]:
    """The last flush runs and the last contract validation (`billing.ops_records`)."""
    with runtime.session_factory() as session:
        found = ops_records.read_records(
            session, (ops_records.FLUSH, ops_records.CONTRACT_VALIDATION)
        )
    flushes = FlushHistory.from_payload(found.get(ops_records.FLUSH))
    return flushes, found.get(ops_records.CONTRACT_VALIDATION)


def read_reconcile_record(runtime: Runtime) -> dict[str, Any] | None:
    with runtime.session_factory() as session:
        return ops_records.read_records(session, (ops_records.RECONCILE,)).get(
            ops_records.RECONCILE
        )


def _read_lock(runtime: Runtime) -> tuple[LockState | None, str | None]:
    """The Redis lock's holder (None: free, or the file backend) and why it is unknown."""
    if runtime.settings.flush_lock_backend != "redis":
        return None, None
    try:
        return inspect_lock(runtime.redis, runtime.settings.flush_lock_key), None
    except redis.RedisError as error:  # the database's state is still worth reporting
        return None, f"Redis error: {error_line(error)}"


def count_unclaimed(runtime: Runtime, organization_id: int | None = None) -> int:
    """The backlog: pending billable_events rows (one organization's, or all)."""
    query = sa.select(sa.func.count()).where(pending_event())
    if organization_id is not None:
        query = query.where(BillableEvent.organization_id == organization_id)
    with runtime.session_factory() as session:
        return int(session.scalar(query) or 0)


def _count_by_status(
    session: Any, column: Any, done: tuple[str, ...], always: tuple[str, ...]
) -> dict[str, int]:
    counts = dict.fromkeys(always, 0)
    rows = session.execute(
        sa.select(column, sa.func.count()).where(column.not_in(done)).group_by(column)
    )
    counts.update({status: int(n) for status, n in rows})
    return counts


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def count_corrections(session: Any) -> dict[str, int]:
    """Usage corrections by status (the finished `applied` ones too: the gauge's series exist
    before the first bad one), and upstream correction rows rejected."""
    counts = dict.fromkeys((s.value for s in CorrectionStatus), 0)
    rows = session.execute(
        sa.select(UsageCorrection.status, sa.func.count()).group_by(UsageCorrection.status)
    )
    counts.update({status: int(n) for status, n in rows})
    counts["rejected"] = int(
        session.scalar(
            sa.select(sa.func.count()).where(BillableEventCorrection.rejected_reason.is_not(None))
        )
        or 0
    )
    return counts
