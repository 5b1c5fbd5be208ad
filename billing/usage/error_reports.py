"""The targeted reconciliation of a meter error report: the errors its samples did not name.

A report counts every meter event Stripe refused in its validation window (`error_count`) but
names only a few per code (`usage.rejections.record_report` marks those). Once Stripe's summaries
of the window can be trusted (`validation_end` + `STRIPE_BILLING_RECONCILE_SETTLE_SECONDS`), the
report's meter is reconciled over the rows sent in the window (a minute either side, for clock
skew): every such row whose usage Stripe does not hold is marked `rejected` too.

Per (customer, hour) of those rows, Stripe's hourly total is compared with all the rows sent for
that hour. The rows Stripe cannot hold at all are missing outright: every event for an event name
without a meter (`no_meter`), every event for a customer Stripe no longer has when the report
names customer errors. Otherwise the gap is attributed as the hourly reconciliation does: to the
one set of the window's rows that makes it up exactly. Nothing is marked when the attribution is
not exact, or when it would mark more rows than the report has errors left unnamed: a row Stripe
did count, re-sent, would bill twice. What is left shows as drift in the hourly reconciliation.

A report is reconciled once (`reconciled_at`, `result`); one whose hours are not settled yet, or
whose summaries Stripe could not read, is tried again on the next run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from billing import logs
from billing.logs import get_logger
from billing.models import MeterErrorReport, UsageSubmission, utcnow
from billing.runtime import Runtime
from billing.stripe_gateway import (
    CUSTOMER_ERROR_CODES,
    ErrorScope,
    StripeGatewayError,
)
from billing.usage import rejections
from billing.usage.reconcile import (
    ACTOR,
    HOUR,
    MISSING_CODE,
    SENT,
    floor_hour,
    missing_rows,
    settle_delay,
)

log = get_logger("billing.reconcile")

# Stripe's clock and ours differ; a row sent just outside the window may still be in it.
WINDOW_MARGIN = timedelta(seconds=60)
NO_METER = "no_meter"
# Reports reconciled per run, oldest first: a backlog drains over a few runs.
MAX_REPORTS_PER_RUN = 100


class _NotYet(Exception):
    """The report cannot be judged now (hours not settled, Stripe unreadable): try later."""


@dataclass
class _Row:
    id: int
    customer: str
    hour: datetime
    value: int
    sent_at: datetime


@dataclass
class ReportResult:
    event_id: str
    meter: str | None
    status: str  # reconciled, ambiguous, postponed
    detail: str = ""
    candidates: int = 0
    rejected: list[int] = field(default_factory=list)
    ambiguous_hours: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "meter": self.meter,
            "status": self.status,
            "detail": self.detail,
            "candidates": self.candidates,
            "rejected": self.rejected,
            "ambiguous_hours": self.ambiguous_hours,
        }


def reconcile_error_reports(runtime: Runtime, now: datetime | None = None) -> list[ReportResult]:
    """Every report due (its settle lag over, not reconciled yet), oldest first."""
    now = now or utcnow()
    cutoff = now - settle_delay(runtime)
    with runtime.session_factory() as session:
        due = session.scalars(
            sa.select(MeterErrorReport)
            .where(
                MeterErrorReport.reconciled_at.is_(None),
                MeterErrorReport.validation_end <= cutoff,
            )
            .order_by(MeterErrorReport.validation_end, MeterErrorReport.id)
            .limit(MAX_REPORTS_PER_RUN)
        ).all()
    meters = runtime.stripe.meter_by_event_name() if due else {}
    return [_reconcile_one(runtime, report, meters, now) for report in due]


def _reconcile_one(
    runtime: Runtime, report: MeterErrorReport, meters: dict[str, Any], now: datetime
) -> ReportResult:
    result = ReportResult(report.stripe_event_id, report.event_name, "reconciled")
    try:
        _attribute(runtime, report, meters, now, result)
    except _NotYet as reason:
        result.status, result.detail = "postponed", str(reason)
        log.info(logs.METER_ERROR_REPORT_POSTPONED, extra=_fields(report, result))
        return result
    with runtime.session_factory.begin() as session:
        session.execute(
            sa.update(MeterErrorReport)
            .where(MeterErrorReport.id == report.id, MeterErrorReport.reconciled_at.is_(None))
            .values(reconciled_at=now, result=result.to_dict())
        )
    level = log.warning if result.rejected or result.status != "reconciled" else log.info
    level(logs.METER_ERROR_REPORT_RECONCILED, extra=_fields(report, result))
    return result


def _attribute(
    runtime: Runtime,
    report: MeterErrorReport,
    meters: dict[str, Any],
    now: datetime,
    result: ReportResult,
) -> None:
    if report.event_name is None or report.validation_start is None:
        result.detail = "the report names no meter event name or window: nothing to look for"
        return
    left = report.error_count - report.matched
    candidates = _sent_in_window(runtime, report)
    result.candidates = len(candidates)
    if left <= 0 or not candidates:
        result.detail = f"{left} error(s) unnamed, {len(candidates)} row(s) sent in the window"
        return
    codes = _sample_codes(runtime, report)
    meter = meters.get(report.event_name)
    missing: list[_Row] = []
    by_customer: dict[str, list[_Row]] = defaultdict(list)
    for row in candidates:
        by_customer[row.customer].append(row)
    for customer, rows in sorted(by_customer.items()):
        missing += _missing_for_customer(runtime, report, meter, customer, rows, codes, now, result)
    if len(missing) > left:
        result.status = "ambiguous"
        result.detail = (
            f"{len(missing)} row(s) look missing but the report leaves only {left} error(s) "
            "unnamed: nothing marked (re-sending a row Stripe did count would bill it twice)"
        )
        return
    message = (
        f"not in Stripe's summary after meter error report {report.stripe_event_id} "
        f"({report.error_count} error(s), {report.sampled} sampled): found by reconciliation"
    )
    result.rejected = rejections.mark_rejected(
        runtime, {row.id: (_code_for(row, codes), message) for row in missing}, ACTOR
    )
    if result.ambiguous_hours:
        result.status = "ambiguous"
    result.detail = (
        f"{len(missing)} of {len(candidates)} row(s) sent in the window are missing from Stripe; "
        f"{left} error(s) were unnamed"
    )


def _missing_for_customer(
    runtime: Runtime,
    report: MeterErrorReport,
    meter: Any,
    customer: str,
    rows: list[_Row],
    codes: _Codes,
    now: datetime,
    result: ReportResult,
) -> list[_Row]:
    if meter is None:
        if NO_METER in codes.all or report.meter_id is None:
            return rows  # no meter for the event name: Stripe counted none of its events
        hours = sorted({f"{customer} {row.hour.isoformat()} (no meter now)" for row in rows})
        result.ambiguous_hours += hours
        return []
    hours = sorted({row.hour for row in rows})
    try:
        totals = runtime.stripe.meter_hourly_totals(meter.id, customer, hours[0], hours[-1] + HOUR)
    except StripeGatewayError as error:
        if error.scope is ErrorScope.CUSTOMER and codes.customer_scoped(customer):
            return rows  # Stripe has no such customer: it counted none of the window's events
        raise _NotYet(f"Stripe's summaries for {customer} could not be read: {error}") from error
    sent = _sent_by_hour(runtime, report.event_name or "", customer, hours)
    settle = settle_delay(runtime)
    missing: list[_Row] = []
    for hour in hours:
        in_window = [row for row in rows if row.hour == hour]
        all_sent = sent.get(hour, [])
        settles_at = max([hour + HOUR, *(row.sent_at for row in all_sent)]) + settle
        if settles_at > now:
            raise _NotYet(f"{customer} {hour:%Y-%m-%d %H:00} settles at {settles_at.isoformat()}")
        gap = sum(row.value for row in all_sent) - totals.get(hour, 0)
        if gap <= 0:
            continue
        found = missing_rows(in_window, gap, lambda row: row.value)
        if found is None:
            result.ambiguous_hours.append(f"{customer} {hour.isoformat()} (gap {gap})")
        else:
            missing += found
    return missing


@dataclass
class _Codes:
    """The codes of the report's samples: all of them, and by customer of the row each named."""

    all: set[str]
    by_customer: dict[str, set[str]]

    def customer_scoped(self, customer: str) -> bool:
        return bool((self.by_customer.get(customer) or self.all) & CUSTOMER_ERROR_CODES)


def _sample_codes(runtime: Runtime, report: MeterErrorReport) -> _Codes:
    samples = report.samples or []
    named = {s["submission_id"]: s["code"] for s in samples if s.get("submission_id")}
    by_customer: dict[str, set[str]] = defaultdict(set)
    if named:
        with runtime.session_factory() as session:
            rows = session.execute(
                sa.select(UsageSubmission.id, UsageSubmission.stripe_customer_id).where(
                    UsageSubmission.id.in_(list(named))
                )
            )
            for row_id, customer in rows:
                by_customer[customer].add(named[row_id])
    return _Codes({s["code"] for s in samples if s.get("code")}, dict(by_customer))


def _code_for(row: _Row, codes: _Codes) -> str:
    """Stripe's code when the samples leave one possible (the customer's, else the report's);
    `reconcile_missing` when they name several."""
    for candidates in (codes.by_customer.get(row.customer), codes.all):
        if candidates and len(candidates) == 1:
            return next(iter(candidates))
    return MISSING_CODE


def _sent_in_window(runtime: Runtime, report: MeterErrorReport) -> list[_Row]:
    assert report.validation_start is not None
    end = report.validation_end or report.validation_start
    return _sent_rows(
        runtime,
        UsageSubmission.event_name == report.event_name,
        UsageSubmission.sent_at >= report.validation_start - WINDOW_MARGIN,
        UsageSubmission.sent_at <= end + WINDOW_MARGIN,
    )


def _sent_by_hour(
    runtime: Runtime, event_name: str, customer: str, hours: list[datetime]
) -> dict[datetime, list[_Row]]:
    found: dict[datetime, list[_Row]] = defaultdict(list)
    for row in _sent_rows(
        runtime,
        UsageSubmission.event_name == event_name,
        UsageSubmission.stripe_customer_id == customer,
        UsageSubmission.window_start >= hours[0],
        UsageSubmission.window_start < hours[-1] + HOUR,
    ):
        found[row.hour].append(row)
    return found


def _sent_rows(runtime: Runtime, *where: Any) -> list[_Row]:
    query = (
        sa.select(
            UsageSubmission.id,
            UsageSubmission.stripe_customer_id,
            UsageSubmission.window_start,
            UsageSubmission.value,
            UsageSubmission.sent_at,
        )
        .where(UsageSubmission.status == SENT, *where)
        .order_by(UsageSubmission.id)
    )
    with runtime.session_factory() as session:
        return [
            _Row(
                row.id,
                row.stripe_customer_id,
                floor_hour(row.window_start),
                int(row.value),
                row.sent_at,
            )
            for row in session.execute(query)
        ]


def _fields(report: MeterErrorReport, result: ReportResult) -> dict[str, Any]:
    return {
        "event_id": report.stripe_event_id,
        "meter": report.event_name,
        "meter_id": report.meter_id,
        "error_count": report.error_count,
        "matched": report.matched,
        "validation_start": report.validation_start.isoformat()
        if report.validation_start
        else None,
        "validation_end": report.validation_end.isoformat() if report.validation_end else None,
        "status": result.status,
        "detail": result.detail,
        "candidates": result.candidates,
        "rejected": result.rejected,
        "ambiguous_hours": result.ambiguous_hours,
    }
