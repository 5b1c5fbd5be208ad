"""Usage corrections, recorded: `flask billing usage correct` and the upstream
`billable_event_corrections` rows become `usage_corrections` rows, checked, idempotent by key.

A correction changes what one organization was billed for one (event type, hour) by `delta`
(negative retracts). It is a record, never an edit of what was claimed or sent: the flush applies
it once (`billing.usage.correcting`), the cheapest correct way for the hour's age (`choose_method`).

Recording refuses, writing nothing: a delta of 0; an hour that is not the start of an hour, lies
ahead, or holds the account's billing-period boundary; an event type without a meter, or a meter
that does not sum (a `last` or `count` meter, or one with an `event_time_window`, keeps or counts
events: a negative value would not subtract); an organization without a Stripe customer; a
retraction larger than what the group was billed (`GroupBilling`); a positive correction of an
invoiced period (only credits can follow an invoice); a key used before with other values. The
same key with the same values is the correction already recorded (`already_recorded: true`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from billing.checks.billability import HOUR
from billing.config import Settings
from billing.errors import OperatorError
from billing.models import (
    MAX_AMOUNT_CENTS,
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
    utcnow,
)
from billing.runtime import Runtime
from billing.stripe_gateway import StripeGateway, subscription_period

UPSTREAM_KEY_PREFIX = "upstream:"
DEFAULT_LIMIT = 100
MAX_KEY_LENGTH = 255
# Postgres bigint: a delta beyond it cannot be stored (an upstream numeric can hold one).
MAX_DELTA = 2**63 - 1
NEXT_FLUSH = "applied by the next flush (`flask billing flush_now` to apply now)"

SENT = SubmissionStatus.SENT.value
CANCELLING = SubmissionStatus.CANCELLING.value
# A correction's own outbox row that is not sent yet still counts: it will be (or waits for an
# operator, who decides; a written-off one counts no more).
COMMITTED = (
    SubmissionStatus.PENDING.value,
    SubmissionStatus.FAILED.value,
    SubmissionStatus.HELD.value,
)


class CorrectionError(ValueError, OperatorError):
    """The correction was refused: nothing was recorded."""


@dataclass(frozen=True)
class CorrectionRequest:
    organization_id: int
    event_type: str
    hour: datetime
    delta: int
    reason: str
    actor: str
    idempotency_key: str | None = None  # None: derived from the values (`default_key`)
    source: str = CorrectionSource.OPERATOR.value

    def key(self) -> str:
        return self.idempotency_key or default_key(self)

    def values(self) -> tuple[Any, ...]:
        """What a re-used key must repeat to name the same correction."""
        return (self.organization_id, self.event_type, self.hour, self.delta, self.reason)


def default_key(request: CorrectionRequest) -> str:
    """The same correction typed twice is one correction; two alike need two keys."""
    text = "|".join(map(str, request.values()))
    return "cli-" + hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class GroupBilling:
    """What one (organization, event type, hour) is billed, once what is in flight lands:
    `delivered` meter events Stripe took (sent, or asked to be cancelled and not yet answered),
    and `corrections`: earlier corrections' rows not sent yet, those not sent at all yet, and
    credits given. Pending usage is left out: it is not billed until Stripe takes it."""

    delivered: int
    corrections: int

    @property
    def billed(self) -> int:
        return self.delivered + self.corrections


@dataclass(frozen=True)
class Target:
    """A meter event a cancel_restate correction asks Stripe to cancel."""

    submission_id: int
    event_name: str
    identifier: str
    value: int


@dataclass(frozen=True)
class Period:
    start: datetime | None
    end: datetime | None

    def invoiced(self, hour: datetime) -> bool:
        return self.start is not None and hour < self.start

    def boundary_in(self, hour: datetime) -> datetime | None:
        for edge in (self.start, self.end):
            if edge is not None and hour < edge < hour + HOUR:
                return edge
        return None


@dataclass(frozen=True)
class Assessment:
    """Everything known about a correction before it is recorded: the checks it passed, the
    group's billing and, as of now, how the flush would apply it."""

    request: CorrectionRequest
    key: str
    billing: GroupBilling
    method: CorrectionMethod
    targets: list[Target] = field(default_factory=list)

    @property
    def billed_after(self) -> int:
        return self.billing.billed + self.request.delta

    def would_send(self) -> dict[str, Any]:
        if self.method == CorrectionMethod.CANCEL_RESTATE:
            cancelled = sum(t.value for t in self.targets)
            return {
                "cancel": [{"identifier": t.identifier, "value": t.value} for t in self.targets],
                "meter_event": {"value": cancelled + self.request.delta, "new_identifier": True},
            }
        if self.method == CorrectionMethod.CORRECTING_EVENT:
            return {"meter_event": {"value": self.request.delta, "new_identifier": True}}
        return {"credit": {"units": -self.request.delta}}


# Checks ----------------------------------------------------------------------------------------


def check_values(request: CorrectionRequest, settings: Settings, now: datetime) -> None:
    """The checks that need nothing but the request."""
    if request.delta == 0:
        raise CorrectionError("a correction changes the billed total: the delta must not be 0")
    if abs(request.delta) > MAX_DELTA:
        raise CorrectionError(f"the delta {request.delta} is beyond what billing can store")
    if not request.reason.strip():
        raise CorrectionError("a correction needs a reason (--reason TEXT)")
    key = request.key()
    if len(key) > MAX_KEY_LENGTH:
        raise CorrectionError(f"the idempotency key is longer than {MAX_KEY_LENGTH} characters")
    if request.source == CorrectionSource.OPERATOR and key.startswith(UPSTREAM_KEY_PREFIX):
        raise CorrectionError(f"idempotency keys starting {UPSTREAM_KEY_PREFIX!r} are upstream's")
    hour = request.hour
    if hour.tzinfo is None or hour != hour.replace(minute=0, second=0, microsecond=0):
        raise CorrectionError(
            f"the hour must be the start of an hour (UTC), got {hour.isoformat()}"
        )
    if hour > now:
        raise CorrectionError(f"the hour {_hour(hour)} lies ahead: nothing was billed for it")
    if request.event_type not in settings.stripe_meters:
        raise CorrectionError(
            f"event type {request.event_type!r} has no meter in STRIPE_BILLING_METERS"
        )


def check_meter(event_name: str, meter: Any | None) -> None:
    """A meter that sums its events, keeping them all: only there does a negative value
    subtract (a `last` meter keeps the newest, an `event_time_window` one the newest per window)."""
    if meter is None or getattr(meter, "status", "active") != "active":
        raise CorrectionError(f"Stripe has no active meter with the event name {event_name!r}")
    formula = meter.default_aggregation.formula
    window = getattr(meter, "event_time_window", None)
    if formula != "sum" or window:
        raise CorrectionError(
            f"meter {event_name!r} aggregates with {formula!r}"
            + (f" per {window}" if window else "")
            + ": a correction needs a `sum` meter without an event_time_window"
        )


def group_billing(
    session: Session, organization_id: int, event_type: str, hour: datetime
) -> GroupBilling:
    """See `GroupBilling`: read from the group's outbox rows and corrections."""
    corrections = list(
        session.scalars(
            sa.select(UsageCorrection).where(
                UsageCorrection.organization_id == organization_id,
                UsageCorrection.event_type == event_type,
                UsageCorrection.hour == hour,
            )
        )
    )
    own_rows = {c.submission_id for c in corrections if c.submission_id is not None}
    rows = list(
        session.execute(
            sa.select(UsageSubmission.id, UsageSubmission.status, UsageSubmission.value).where(
                sa.or_(
                    sa.and_(
                        UsageSubmission.organization_id == organization_id,
                        UsageSubmission.event_type == event_type,
                        UsageSubmission.window_start >= hour,
                        UsageSubmission.window_start < hour + HOUR,
                    ),
                    UsageSubmission.id.in_(sorted(own_rows)),
                )
            )
        )
    )
    delivered = sum(int(r.value) for r in rows if r.status in (SENT, CANCELLING))
    corrected = sum(int(r.value) for r in rows if r.id in own_rows and r.status in COMMITTED)
    cancelled = _cancelled_values(session, [c.id for c in corrections])
    for c in corrections:
        if c.status == CorrectionStatus.REQUESTED:
            corrected += c.delta
        elif c.status in (CorrectionStatus.CANCELLING, CorrectionStatus.HELD):
            # Not released yet: its row will carry what was cancelled, plus the delta.
            corrected += c.delta + cancelled.get(c.id, 0)
        elif c.status == CorrectionStatus.APPLIED and c.method == CorrectionMethod.CREDIT:
            corrected += c.delta
    return GroupBilling(delivered=delivered, corrections=corrected)


def _cancelled_values(session: Session, correction_ids: Sequence[int]) -> dict[int, int]:
    if not correction_ids:
        return {}
    query = (
        sa.select(UsageCorrectionCancel.correction_id, sa.func.sum(UsageCorrectionCancel.value))
        .where(
            UsageCorrectionCancel.correction_id.in_(correction_ids),
            UsageCorrectionCancel.status == CancelStatus.CANCELLED.value,
        )
        .group_by(UsageCorrectionCancel.correction_id)
    )
    return {cid: int(total) for cid, total in session.execute(query)}


def cancel_targets(
    session: Session, settings: Settings, request: CorrectionRequest, now: datetime
) -> list[Target]:
    """The group's sent meter events Stripe received less than 24 hours ago (our row's
    `created_at` is before Stripe's receipt; the resend window leaves an hour's margin)."""
    cutoff = now - timedelta(hours=settings.resend_window_hours)
    hour = request.hour
    rows = session.execute(
        sa.select(
            UsageSubmission.id,
            UsageSubmission.event_name,
            UsageSubmission.identifier,
            UsageSubmission.value,
        )
        .where(
            UsageSubmission.organization_id == request.organization_id,
            UsageSubmission.event_type == request.event_type,
            UsageSubmission.window_start >= hour,
            UsageSubmission.window_start < hour + HOUR,
            UsageSubmission.status == SENT,
            UsageSubmission.created_at > cutoff,
        )
        .order_by(UsageSubmission.id)
    )
    return [Target(r.id, r.event_name, r.identifier, int(r.value)) for r in rows]


def choose_method(period: Period, hour: datetime, targets: Sequence[Target]) -> CorrectionMethod:
    """The cheapest correct way for the hour's age: a closed period was invoiced (a draft or a
    final invoice), so only a credit reaches it; an open one takes meter events."""
    if period.invoiced(hour):
        return CorrectionMethod.CREDIT
    return CorrectionMethod.CANCEL_RESTATE if targets else CorrectionMethod.CORRECTING_EVENT


def refuse_unplannable(request: CorrectionRequest, period: Period) -> None:
    """What no method can apply; checked when recording and again when the flush plans."""
    boundary = period.boundary_in(request.hour)
    if boundary is not None:
        raise CorrectionError(
            f"the hour {_hour(request.hour)} holds organization {request.organization_id}'s "
            f"billing period boundary ({boundary.isoformat()}): its usage is split between two "
            "invoices; correct it with an adjustment instead (`flask billing adjustments add`)"
        )
    if request.delta > 0 and period.invoiced(request.hour):
        assert period.start is not None
        raise CorrectionError(
            f"the hour {_hour(request.hour)} is in a period already invoiced (the current one "
            f"started {period.start.isoformat()}): only a credit can follow an invoice, and a "
            "credit cannot charge more. Bill the missing usage in the current period instead: "
            f"`flask billing usage correct` with an --hour at or after {_hour(period.start)} "
            "(or a billable_events row there); nothing was recorded"
        )


def assess(
    session: Session,
    settings: Settings,
    request: CorrectionRequest,
    meter: Any | None,
    now: datetime,
) -> Assessment:
    """Every check against the database, under the organization's lock (`lock_organization`),
    so two corrections of one group cannot both retract the same units."""
    check_values(request, settings, now)
    check_meter(settings.stripe_meters[request.event_type], meter)
    account = session.get(BillingAccount, request.organization_id)
    if account is None or not account.stripe_customer_id:
        raise CorrectionError(
            f"organization {request.organization_id} has no billing account with a Stripe "
            "customer: nothing was billed to correct"
        )
    period = Period(account.current_period_start, account.current_period_end)
    refuse_unplannable(request, period)
    billing = group_billing(session, request.organization_id, request.event_type, request.hour)
    if billing.billed + request.delta < 0:
        raise CorrectionError(
            f"retraction of {-request.delta} exceeds the {billing.billed} billed for organization "
            f"{request.organization_id}, {request.event_type}, {_hour(request.hour)} "
            f"(delivered {billing.delivered}, earlier corrections {billing.corrections}; usage "
            "not yet sent to Stripe is not counted); nothing was recorded"
        )
    targets = cancel_targets(session, settings, request, now)
    method = choose_method(period, request.hour, targets)
    if method != CorrectionMethod.CANCEL_RESTATE:
        targets = []
    return Assessment(request, request.key(), billing, method, targets)


def lock_organization(session: Session, organization_id: int) -> None:
    """Serialize corrections of one organization: its account row on PostgreSQL, the write lock
    on SQLite (which has no row locks)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            sa.select(BillingAccount.organization_id)
            .where(BillingAccount.organization_id == organization_id)
            .with_for_update()
        )
    else:
        session.execute(sa.text("UPDATE usage_corrections SET id = id WHERE 0"))


def refresh_stale_period(
    sessions: sessionmaker[Session], gateway: StripeGateway, organization_id: int, now: datetime
) -> None:
    """The stored period is a cache: once it has ended (a renewal whose webhook is late) it says
    nothing about which hours were invoiced, so it is read again from Stripe."""
    with sessions() as session:
        account = session.get(BillingAccount, organization_id)
        if account is None or not account.stripe_subscription_id:
            return
        end, subscription_id = account.current_period_end, account.stripe_subscription_id
    if end is not None and end > now:
        return
    period = subscription_period(gateway.retrieve_subscription(subscription_id))
    if period is None:
        return
    with sessions.begin() as session:
        session.execute(
            sa.update(BillingAccount)
            .where(BillingAccount.organization_id == organization_id)
            .values(current_period_start=period[0], current_period_end=period[1])
        )


# Recording -------------------------------------------------------------------------------------


def record_in(
    session: Session,
    settings: Settings,
    request: CorrectionRequest,
    meter: Any | None,
    now: datetime,
) -> tuple[UsageCorrection, Assessment | None]:
    """Record the correction in the caller's transaction, or find it by key; the assessment is
    None when it was recorded before."""
    key = request.key()
    lock_organization(session, request.organization_id)
    existing = session.scalar(
        sa.select(UsageCorrection).where(UsageCorrection.idempotency_key == key)
    )
    if existing is not None:
        return _same(existing, request), None
    assessment = assess(session, settings, request, meter, now)
    correction = UsageCorrection(
        idempotency_key=key,
        source=request.source,
        organization_id=request.organization_id,
        event_type=request.event_type,
        hour=request.hour,
        delta=request.delta,
        reason=request.reason.strip(),
        actor=request.actor,
        status=CorrectionStatus.REQUESTED.value,
        billed_before=assessment.billing.billed,
        created_at=now,
        updated_at=now,
    )
    session.add(correction)
    session.flush()
    return correction, assessment


def _same(existing: UsageCorrection, request: CorrectionRequest) -> UsageCorrection:
    found = (
        existing.organization_id,
        existing.event_type,
        existing.hour,
        existing.delta,
        existing.reason,
    )
    wanted = (*request.values()[:4], request.reason.strip())
    if found != wanted:
        raise CorrectionError(
            f"idempotency key {existing.idempotency_key!r} was used for correction {existing.id} "
            f"({_describe(existing)}); a different correction needs another key; nothing was "
            "recorded"
        )
    return existing


def record_correction(
    runtime: Runtime,
    request: CorrectionRequest,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
) -> dict[str, Any]:
    """`flask billing usage correct`: check, then record (or, `dry_run`, only say what the
    flush would send as of now)."""
    now = now or utcnow()
    check_values(request, runtime.settings, now)
    event_name = runtime.settings.stripe_meters[request.event_type]
    meter = runtime.stripe.meter_by_event_name().get(event_name)
    refresh_stale_period(runtime.session_factory, runtime.stripe, request.organization_id, now)
    sessions = runtime.session_factory
    with sessions() if dry_run else sessions.begin() as session:
        if dry_run:
            lock_organization(session, request.organization_id)
            assessment = assess(session, runtime.settings, request, meter, now)
            return _dry_run(runtime, session, assessment)
        correction, assessment = record_in(session, runtime.settings, request, meter, now)
        shown = correction_dict(session, correction)
    shown["already_recorded"] = assessment is None
    if assessment is not None:
        shown["would_send"] = assessment.would_send()
        shown["method_as_of_now"] = assessment.method.value
    shown["next"] = NEXT_FLUSH
    return shown


def _dry_run(runtime: Runtime, session: Session, assessment: Assessment) -> dict[str, Any]:
    request = assessment.request
    would_send = assessment.would_send()
    if assessment.method == CorrectionMethod.CREDIT:
        account = session.get(BillingAccount, request.organization_id)
        assert account is not None
        would_send["credit"] |= credit_quote(runtime.stripe, runtime.settings, account, request)
    return {
        "dry_run": True,
        "organization_id": request.organization_id,
        "event_type": request.event_type,
        "hour": request.hour.isoformat(),
        "delta": request.delta,
        "reason": request.reason.strip(),
        "actor": request.actor,
        "idempotency_key": assessment.key,
        "billed_before": assessment.billing.billed,
        "billed": asdict(assessment.billing),
        "billed_after": assessment.billed_after,
        "method_as_of_now": assessment.method.value,
        "would_send": would_send,
        "note": "nothing was recorded; the flush decides the method when it applies it",
    }


# Credits ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreditPrice:
    unit_amount_decimal: Decimal
    currency: str

    def cents(self, units: int) -> int:
        return int((self.unit_amount_decimal * units).to_integral_value(ROUND_HALF_UP))


def credit_price(
    gateway: StripeGateway, settings: Settings, account: BillingAccount, event_type: str
) -> CreditPrice:
    """The per-unit price the subscription bills the meter with (a credit gives back units at
    it); refused for tiered prices and without a subscription."""
    event_name = settings.stripe_meters[event_type]
    if not account.stripe_subscription_id:
        raise CorrectionError(
            f"organization {account.organization_id} has no Stripe subscription to price a credit"
        )
    meter = gateway.meter_by_event_name().get(event_name)
    price = (
        gateway.subscription_item_price(account.stripe_subscription_id, meter.id) if meter else None
    )
    if price is None:
        raise CorrectionError(
            f"subscription {account.stripe_subscription_id} has no price on meter {event_name!r}"
        )
    if (
        getattr(price, "billing_scheme", "per_unit") != "per_unit"
        or price.unit_amount_decimal is None
    ):
        raise CorrectionError(
            f"price {price.id} is not a per-unit price: give the credit by hand "
            "(`flask billing adjustments add --kind credit`)"
        )
    return CreditPrice(Decimal(str(price.unit_amount_decimal)), str(price.currency))


def credit_quote(
    gateway: StripeGateway, settings: Settings, account: BillingAccount, request: CorrectionRequest
) -> dict[str, Any]:
    price = credit_price(gateway, settings, account, request.event_type)
    return {"amount_cents": price.cents(-request.delta), "currency": price.currency}


def check_credit_cents(cents: int) -> None:
    if cents > MAX_AMOUNT_CENTS:
        raise CorrectionError(
            f"the credit of {cents} cents is above Stripe's largest amount ({MAX_AMOUNT_CENTS})"
        )


def credit_description(correction: UsageCorrection) -> str:
    """The credit's line on the invoice: which correction, what and why (Stripe keeps 500)."""
    text = (
        f"Usage correction #{correction.id}: {correction.delta} {correction.event_type} "
        f"{_hour(correction.hour)} ({correction.reason})"
    )
    return text if len(text) <= 500 else text[:497] + "..."


def credit_descriptions(
    session: Session, adjustment_ids: Iterable[int]
) -> dict[int, tuple[int, str]]:
    """{billing adjustment id: (usage correction id, the credit's line)} for the credits that
    usage corrections made."""
    ids = sorted(set(adjustment_ids))
    if not ids:
        return {}
    found = session.scalars(
        sa.select(UsageCorrection).where(UsageCorrection.billing_adjustment_id.in_(ids))
    )
    return {
        c.billing_adjustment_id: (c.id, credit_description(c))
        for c in found
        if c.billing_adjustment_id is not None
    }


# Listing ---------------------------------------------------------------------------------------


def list_corrections(
    runtime: Runtime, *, organization_id: int | None = None, limit: int = DEFAULT_LIMIT
) -> dict[str, Any]:
    """Corrections (newest first, at most `limit`) with what each sent, and the upstream rows
    rejected (they stay; a producer fixes one by inserting a new row with a new key)."""
    query = sa.select(UsageCorrection).order_by(UsageCorrection.id.desc())
    rejected = sa.select(BillableEventCorrection).where(
        BillableEventCorrection.rejected_reason.is_not(None)
    )
    counted = sa.select(UsageCorrection.status, sa.func.count()).group_by(UsageCorrection.status)
    if organization_id is not None:
        query = query.where(UsageCorrection.organization_id == organization_id)
        rejected = rejected.where(BillableEventCorrection.organization_id == organization_id)
        counted = counted.where(UsageCorrection.organization_id == organization_id)
    with runtime.session_factory() as session:
        corrections = [correction_dict(session, c) for c in session.scalars(query.limit(limit))]
        refused = [
            _upstream_dict(row)
            for row in session.scalars(
                rejected.order_by(BillableEventCorrection.id.desc()).limit(limit)
            )
        ]
        counts = {status: int(n) for status, n in session.execute(counted)}
    return {
        "counts": {s.value: counts.get(s.value, 0) for s in CorrectionStatus},
        "corrections": corrections,
        "rejected_upstream": refused,
    }


def correction_dict(session: Session, correction: UsageCorrection) -> dict[str, Any]:
    """One correction as the commands show it, with what it sent."""
    sent: dict[str, Any] = {}
    cancels = list(
        session.scalars(
            sa.select(UsageCorrectionCancel)
            .where(UsageCorrectionCancel.correction_id == correction.id)
            .order_by(UsageCorrectionCancel.id)
        )
    )
    if cancels:
        sent["cancelled"] = [
            {
                "submission_id": c.submission_id,
                "identifier": c.identifier,
                "value": c.value,
                "status": c.status,
                "attempts": c.attempts,
                "last_error": c.last_error,
            }
            for c in cancels
        ]
    if correction.submission_id is not None:
        row = session.get(UsageSubmission, correction.submission_id)
        assert row is not None
        sent["meter_event"] = {
            "submission_id": row.id,
            "identifier": row.identifier,
            "value": row.value,
            "timestamp": row.window_start.isoformat(),
            "status": row.status,
        }
    if correction.billing_adjustment_id is not None:
        credit = session.get(BillingAdjustment, correction.billing_adjustment_id)
        assert credit is not None
        sent["credit"] = {
            "adjustment_id": credit.id,
            "amount_cents": credit.amount_cents,
            "currency": credit.currency,
            "consumed_invoice_id": credit.consumed_invoice_id,
        }
    return {
        "id": correction.id,
        "status": correction.status,
        "method": correction.method,
        "source": correction.source,
        "organization_id": correction.organization_id,
        "event_type": correction.event_type,
        "hour": correction.hour.isoformat(),
        "delta": correction.delta,
        "billed_before": correction.billed_before,
        "reason": correction.reason,
        "actor": correction.actor,
        "idempotency_key": correction.idempotency_key,
        "created_at": correction.created_at.isoformat(),
        "applied_at": correction.applied_at.isoformat() if correction.applied_at else None,
        "last_error": correction.last_error,
        "sent": sent,
    }


def _upstream_dict(row: BillableEventCorrection) -> dict[str, Any]:
    return {
        "id": row.id,
        "organization_id": row.organization_id,
        "event_type": row.event_type,
        "hour": row.hour.isoformat(),
        "delta": str(row.delta),
        "idempotency_key": row.idempotency_key,
        "source": row.source,
        "rejected_reason": row.rejected_reason,
        "taken_at": row.taken_at.isoformat() if row.taken_at else None,
    }


def _describe(correction: UsageCorrection) -> str:
    return (
        f"organization {correction.organization_id}, {correction.event_type}, "
        f"{_hour(correction.hour)}, delta {correction.delta}"
    )


def _hour(hour: datetime) -> str:
    return f"{hour:%Y-%m-%dT%H:%M}Z"
