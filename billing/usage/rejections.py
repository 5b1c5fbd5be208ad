"""Meter events Stripe accepted and then refused: outbox rows `rejected`, from meter error reports.

Live Stripe answers a well-formed meter event 200 ("accepted for processing") and checks the
customer mapping, the value and the meter afterwards. What fails is never billed, and is reported
in a thin event (`v1.billing.meter.error_report_triggered`, `v1.billing.meter.no_meter_found`)
whose full form holds a few sample errors per code, each naming the request's identifier.

`record_report` stores a fetched report once per Stripe event id and marks the rows its samples
name; `mark_rejected` is the one way a row becomes `rejected` (the reconciliation marks the rows a
report did not sample with it too). A rejected row waits for an operator like a failed one: once
the cause is fixed, `submissions retry --status rejected` re-queues it with a NEW identifier
(`usage.outbox`), since Stripe may still dedupe the refused one.

A sample's `request.identifier` is documented as "the request idempotency key"; which value live
Stripe puts there is not confirmed, so both are mapped: our idempotency key
(`billing-usage-<identifier>[-rN]`, `UsageSubmission.idempotency_key`) and a bare identifier.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from billing import logs, metrics
from billing.models import (
    MeterErrorReport,
    SubmissionAction,
    SubmissionStatus,
    UsageSubmission,
    UsageSubmissionAction,
    utcnow,
)
from billing.runtime import Runtime
from billing.stripe_gateway import MeterErrorReportEvent, rejection_scope

log = logs.get_logger("billing.usage.rejections")

REJECTED = SubmissionStatus.REJECTED.value
# A refusal is news about a row Stripe was sent: sent, or sent and not yet recorded (pending), or
# held (unsent past the window, an earlier attempt maybe accepted). Failed rows were refused
# synchronously already; rejected, written-off rows are left as they are (idempotent).
MARKABLE = (
    SubmissionStatus.SENT.value,
    SubmissionStatus.PENDING.value,
    SubmissionStatus.HELD.value,
)
IDEMPOTENCY_KEY = re.compile(r"^billing-usage-(?P<identifier>.+?)(?:-r\d+)?$")
MAX_ERROR_LENGTH = 4000


def identifier_candidates(request_identifier: str) -> tuple[str, ...]:
    """The outbox identifiers a sample's `request.identifier` may stand for: itself, and the
    identifier inside one of our idempotency keys (a `-rN` re-send key included)."""
    found = IDEMPOTENCY_KEY.match(request_identifier)
    if found is None:
        return (request_identifier,)
    return (request_identifier, found["identifier"])


@dataclass(frozen=True)
class Marked:
    """A row this call marked rejected."""

    submission_id: int
    organization_id: int
    event_name: str
    identifier: str
    value: int
    code: str
    previous_status: str


def mark_rejected(
    runtime: Runtime, rejections: Mapping[int, tuple[str, str]], actor: str
) -> list[int]:
    """Mark outbox rows `rejected`: {submission id: (Stripe's code, Stripe's message)}.

    Only rows that are sent, pending or held change (compare-and-set in one transaction), each
    with a `reject` action row (actor, previous status, error and identifier) and one count of
    `billing_meter_events_rejected_total{code}`; a row already rejected, written off, failed or
    re-queued under a new identifier is left alone, so a repeated call changes nothing. Returns
    the ids this call changed, sorted."""
    if not rejections:
        return []
    with runtime.session_factory.begin() as session:
        marked = _mark(session, rejections, actor, utcnow())
    _report_marked(marked)
    return sorted(m.submission_id for m in marked)


def _mark(
    session: Session, rejections: Mapping[int, tuple[str, str]], actor: str, now: datetime
) -> list[Marked]:
    rows = session.scalars(
        sa.select(UsageSubmission)
        .where(UsageSubmission.id.in_(sorted(rejections)), UsageSubmission.status.in_(MARKABLE))
        .order_by(UsageSubmission.id)
        .with_for_update()
    ).all()
    marked: list[Marked] = []
    for row in rows:
        code, message = rejections[row.id]
        error = f"{code}: {message}"[:MAX_ERROR_LENGTH]
        changed = session.execute(
            sa.update(UsageSubmission)
            .where(UsageSubmission.id == row.id, UsageSubmission.status == row.status)
            .values(
                status=REJECTED,
                last_error=error,
                last_error_scope=rejection_scope(code).value,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if changed != 1:  # moved meanwhile (row locks make this rare): the new status stands
            continue
        session.add(
            UsageSubmissionAction(
                submission_id=row.id,
                action=SubmissionAction.REJECT.value,
                previous_status=row.status,
                new_status=REJECTED,
                previous_error=row.last_error,
                previous_identifier=row.identifier,
                reason=error,
                actor=actor,
                created_at=now,
            )
        )
        marked.append(
            Marked(
                row.id,
                row.organization_id,
                row.event_name,
                row.identifier,
                row.value,
                code,
                row.status,
            )
        )
    return marked


def _report_marked(marked: list[Marked]) -> None:
    """After the commit: a log line and a count per row."""
    for row in marked:
        metrics.METER_EVENTS_REJECTED.labels(code=row.code).inc()
        log.error(
            logs.METER_EVENT_REJECTED,
            extra={
                "organization_id": row.organization_id,
                "meter": row.event_name,
                "identifier": row.identifier,
                "code": row.code,
                "submission_id": row.submission_id,
                "value": row.value,
                "previous_status": row.previous_status,
            },
        )


# Meter error reports ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedReport:
    """What `record_report` did with one report."""

    event_id: str
    duplicate: bool  # stored by an earlier delivery or run: nothing changed this time
    error_count: int = 0
    sampled: int = 0
    matched: int = 0  # samples that name an outbox row (its identifier now or before)
    rejected: list[int] = field(default_factory=list)  # rows this call marked
    unmatched: list[str] = field(default_factory=list)  # request identifiers of no row of ours

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "duplicate": self.duplicate,
            "error_count": self.error_count,
            "sampled": self.sampled,
            "matched": self.matched,
            "rejected": self.rejected,
            "unmatched": self.unmatched,
        }


def record_report(runtime: Runtime, report: MeterErrorReportEvent) -> RecordedReport:
    """Store the report once (by Stripe's event id) and mark the rows its samples name, in one
    transaction: a report stored before (a redelivery, a replay) changes nothing, and a crash
    leaves neither the report nor its marks.

    A sample naming an identifier a re-queue replaced is not marked again: the row was re-sent
    under a new identifier since. A sample naming no row is logged. When every error is matched
    the report is reconciled at once; else the reconciliation looks for the rows it did not
    sample (`error_count` counts every error, the samples are a few per code)."""
    now = utcnow()
    with runtime.session_factory.begin() as session:
        recorded = _record(session, report, now)
    fields = {
        "event_id": report.event_id,
        "event_type": report.type,
        "meter_id": report.meter_id,
        "meter": report.event_name,
    }
    if recorded is None:
        log.info(logs.METER_ERROR_REPORT_DUPLICATE, extra=fields)
        return RecordedReport(report.event_id, duplicate=True)
    mapped, marked = recorded
    _report_marked(marked)
    for sample in mapped.samples:
        _log_sample(sample, fields)
    result = RecordedReport(
        report.event_id,
        duplicate=False,
        error_count=report.error_count,
        sampled=len(report.samples),
        matched=mapped.matched,
        rejected=sorted(m.submission_id for m in marked),
        unmatched=[s["request_identifier"] or "" for s in mapped.samples if not s["submission_id"]],
    )
    log.warning(
        logs.METER_ERROR_REPORTED,
        extra={
            **fields,
            **{k: v for k, v in result.to_dict().items() if k not in ("event_id", "duplicate")},
            "validation_start": _iso(report.validation_start),
            "validation_end": _iso(report.validation_end),
            "summary": report.summary,
        },
    )
    return result


def _record(
    session: Session, report: MeterErrorReportEvent, now: datetime
) -> tuple[_Mapped, list[Marked]] | None:
    """The samples as mapped and the rows marked; None when the report is stored already."""
    report_id = _insert_report(session, report, now)
    if report_id is None:
        return None
    mapped = _map_samples(session, report)
    marked = _mark(session, mapped.rejections, f"stripe:{report.event_id}", now)
    event_names = {s["event_name"] for s in mapped.samples if s["event_name"]}
    session.execute(
        sa.update(MeterErrorReport)
        .where(MeterErrorReport.id == report_id)
        .values(
            matched=mapped.matched,
            samples=[_stored(s) for s in mapped.samples],
            # no_meter_found names no meter: the event name its rows were sent under, if one
            event_name=report.event_name or (event_names.pop() if len(event_names) == 1 else None),
            reconciled_at=now if mapped.matched >= report.error_count else None,
        )
    )
    return mapped, marked


def _insert_report(session: Session, report: MeterErrorReportEvent, now: datetime) -> int | None:
    """The report's row id, or None when its Stripe event id is stored already."""
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
    return session.scalar(
        insert(MeterErrorReport)
        .values(
            stripe_event_id=report.event_id,
            type=report.type,
            meter_id=report.meter_id,
            event_name=report.event_name,
            validation_start=report.validation_start,
            validation_end=report.validation_end,
            error_count=report.error_count,
            sampled=len(report.samples),
            matched=0,
            summary=report.summary,
            samples=[],
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["stripe_event_id"])
        .returning(MeterErrorReport.id)
    )


@dataclass
class _Mapped:
    samples: list[dict[str, Any]]
    rejections: dict[int, tuple[str, str]]

    @property
    def matched(self) -> int:
        """Samples naming an outbox row (by its identifier now or one it had)."""
        return sum(1 for s in self.samples if s["submission_id"] is not None)


def _map_samples(session: Session, report: MeterErrorReportEvent) -> _Mapped:
    """Each sample's outbox row: by its identifier now, else by one a re-queue replaced."""
    candidates = {
        sample.request_identifier: identifier_candidates(sample.request_identifier)
        for sample in report.samples
        if sample.request_identifier
    }
    wanted = sorted({c for found in candidates.values() for c in found})
    current = _rows_by_identifier(session, wanted)
    replaced = _replaced_identifiers(session, [c for c in wanted if c not in current])
    samples: list[dict[str, Any]] = []
    rejections: dict[int, tuple[str, str]] = {}
    for sample in report.samples:
        entry: dict[str, Any] = {
            "code": sample.code,
            "message": sample.message,
            "request_identifier": sample.request_identifier,
            "submission_id": None,
            "organization_id": None,
            "event_name": None,
            "identifier": None,
            "outcome": "unmatched",
        }
        names = candidates.get(sample.request_identifier or "", ())
        row = next((current[n] for n in names if n in current), None)
        if row is not None:
            entry |= {
                "submission_id": row.id,
                "organization_id": row.organization_id,
                "event_name": row.event_name,
                "identifier": row.identifier,
                "outcome": "rejected" if row.status in MARKABLE else f"left {row.status}",
            }
            if row.status in MARKABLE:
                rejections.setdefault(row.id, (sample.code, sample.message))
        elif (old := next((n for n in names if n in replaced), None)) is not None:
            entry |= {"submission_id": replaced[old], "identifier": old, "outcome": "requeued"}
        samples.append(entry)
    return _Mapped(samples, rejections)


def _rows_by_identifier(session: Session, identifiers: Collection[str]) -> dict[str, Any]:
    if not identifiers:
        return {}
    rows = session.execute(
        sa.select(
            UsageSubmission.id,
            UsageSubmission.identifier,
            UsageSubmission.organization_id,
            UsageSubmission.event_name,
            UsageSubmission.status,
        ).where(UsageSubmission.identifier.in_(list(identifiers)))
    ).all()
    return {row.identifier: row for row in rows}


def _replaced_identifiers(session: Session, identifiers: Collection[str]) -> dict[str, int]:
    """{identifier a re-queue replaced: the row's id}."""
    if not identifiers:
        return {}
    rows = session.execute(
        sa.select(UsageSubmissionAction.previous_identifier, UsageSubmissionAction.submission_id)
        .where(
            UsageSubmissionAction.action == SubmissionAction.REISSUE.value,
            UsageSubmissionAction.previous_identifier.in_(list(identifiers)),
        )
        .distinct()
    ).all()
    return {str(row.previous_identifier): int(row.submission_id) for row in rows}


def _stored(sample: dict[str, Any]) -> dict[str, Any]:
    return {
        k: sample[k] for k in ("code", "message", "request_identifier", "submission_id", "outcome")
    }


def _log_sample(sample: dict[str, Any], fields: dict[str, Any]) -> None:
    line = {
        **fields,
        "organization_id": sample["organization_id"],
        "meter": sample["event_name"] or fields["meter"],
        "identifier": sample["identifier"] or sample["request_identifier"],
        "code": sample["code"],
        "error_message": sample["message"],
        "submission_id": sample["submission_id"],
    }
    if sample["outcome"] == "unmatched":
        log.warning(logs.METER_ERROR_SAMPLE_UNMATCHED, extra=line)
    elif sample["outcome"] == "requeued":
        log.info(logs.METER_ERROR_SAMPLE_REQUEUED, extra=line)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
