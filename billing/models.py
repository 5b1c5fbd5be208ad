"""SQLAlchemy models. The schema itself is created by the Alembic chain in `billing/migrations`."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets BIGINT identity columns.
BigId = BigInteger().with_variant(Integer(), "sqlite")
QUANTITY = Numeric().with_variant(BigInteger(), "sqlite")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, also on SQLite (which stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: billing stores timezone-aware UTC only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SubmissionStatus(enum.StrEnum):
    PENDING = "pending"  # claimed and written, not yet confirmed by Stripe
    SENT = "sent"  # Stripe accepted it (or already had its identifier)
    FAILED = "failed"  # Stripe refused it permanently; the error is kept
    HELD = "held"  # unsent past Stripe's identifier window: reconcile before re-sending
    WRITTEN_OFF = "written_off"  # an operator decided it is never billed (reason recorded)
    # Stripe accepted the request, then refused the event asynchronously (a meter error report):
    # never billed; retried with a NEW identifier once the cause is fixed.
    REJECTED = "rejected"
    # A usage correction asked Stripe to cancel this row's meter event; the outcome is not known.
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"  # Stripe cancelled its meter event (a usage correction): bills nothing


class SubmissionAction(enum.StrEnum):
    RETRY = "retry"  # failed -> pending, same identifier
    REISSUE = "reissue"  # held (after reconciliation) or rejected -> pending, new identifier
    WRITE_OFF = "write_off"  # failed, held or rejected -> written_off
    RECONCILED = "reconciled"  # held -> sent: Stripe's summaries show it was delivered
    REJECT = "reject"  # sent (or pending, held) -> rejected: Stripe reported the event invalid


class WebhookStatus(enum.StrEnum):
    RECEIVED = "received"
    PROCESSING = "processing"
    PROCESSED = "processed"
    IGNORED = "ignored"
    FAILED = "failed"


class BillableEvent(Base):
    """The upstream table: written by the product, read (and claimed) by billing."""

    __tablename__ = "billable_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    organization_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    event_type: Mapped[str] = mapped_column(String(100), nullable=False)
    # numeric, not bigint: PostgreSQL would round a producer's 1.5 to 2 before billing saw it.
    # SQLite keeps a fraction as written in an integer column (type affinity).
    quantity: Mapped[Decimal] = mapped_column(QUANTITY, nullable=False)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    source: Mapped[str | None] = mapped_column(String(64))
    idempotency_key: Mapped[str] = mapped_column(String(255), nullable=False, unique=True)
    # Not in the contract: a database default, so a producer's plain INSERT of the contract's
    # columns succeeds.
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, server_default=sa.func.current_timestamp()
    )
    # Billing-owned: which outbox row claimed this event, and when.
    usage_submission_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("usage_submissions.id", ondelete="RESTRICT")
    )
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Billing-owned: an operator dismissed this row as never billable (`usage dismiss`).
    usage_dismissal_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("usage_dismissals.id", ondelete="RESTRICT")
    )

    __table_args__ = (
        # The flush scans only unclaimed rows; a partial index keeps that scan small forever.
        Index(
            "ix_billable_events_unclaimed",
            "occurred_at",
            "organization_id",
            postgresql_where=text("usage_submission_id IS NULL"),
            sqlite_where=text("usage_submission_id IS NULL"),
        ),
        # The claim reads unclaimed rows in group order (organization, type, time).
        Index(
            "ix_billable_events_unclaimed_by_group",
            "organization_id",
            "event_type",
            "occurred_at",
            "id",
            postgresql_where=text("usage_submission_id IS NULL"),
            sqlite_where=text("usage_submission_id IS NULL"),
        ),
        Index("ix_billable_events_usage_submission_id", "usage_submission_id"),
        Index("ix_billable_events_organization_id_occurred_at", "organization_id", "occurred_at"),
        Index(
            "ix_billable_events_usage_dismissal_id",
            "usage_dismissal_id",
            postgresql_where=text("usage_dismissal_id IS NOT NULL"),
            sqlite_where=text("usage_dismissal_id IS NOT NULL"),
        ),
    )


def pending_event(events: Any = None) -> sa.ColumnElement[bool]:
    """A billable event still to be billed: no flush claimed it and no operator dismissed it.

    Every read of the backlog (claiming, the contract checks, the counts, gauges and alerts) uses
    this one predicate, so a dismissed row leaves all of them at once."""
    columns = (BillableEvent.__table__ if events is None else events).c
    return sa.and_(columns.usage_submission_id.is_(None), columns.usage_dismissal_id.is_(None))


def id_in(column: Any, ids: Sequence[int], dialect: str) -> sa.ColumnElement[bool]:
    """`column IN ids`; on PostgreSQL one array parameter instead of thousands of bound values."""
    if dialect == "postgresql":
        return column == sa.any_(sa.cast(sa.literal(list(ids)), sa.ARRAY(sa.BigInteger)))
    return column.in_(ids)


class UsageDismissal(Base):
    """An operator's decision that some billable events are never billed: who, when and why."""

    __tablename__ = "usage_dismissals"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    unbillable_reason: Mapped[str | None] = mapped_column(String(32))
    event_count: Mapped[int] = mapped_column(Integer, nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    actor: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class OpsRecord(Base):
    """The last outcome of a kind of run (flush, contract check), readable by every scrape:
    a short-lived CLI process's in-memory counters die with it."""

    __tablename__ = "ops_records"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow
    )


class BillingAccount(Base):
    __tablename__ = "billing_accounts"

    organization_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    stripe_subscription_id: Mapped[str | None] = mapped_column(String(255))
    subscription_status: Mapped[str | None] = mapped_column(String(32))
    current_period_start: Mapped[datetime | None] = mapped_column(UTCDateTime)
    current_period_end: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow
    )


class UsageSubmission(Base):
    """The outbox: one meter event sent, or still to send, to Stripe."""

    __tablename__ = "usage_submissions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    organization_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    stripe_customer_id: Mapped[str] = mapped_column(String(255), nullable=False)
    event_type: Mapped[str] = mapped_column(String(100), nullable=False)
    event_name: Mapped[str] = mapped_column(String(100), nullable=False)
    value: Mapped[int] = mapped_column(BigInteger, nullable=False)
    event_count: Mapped[int] = mapped_column(Integer, nullable=False)
    window_start: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    window_end: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    identifier: Mapped[str] = mapped_column(String(100), nullable=False, unique=True)
    status: Mapped[str] = mapped_column(
        String(16), nullable=False, default=SubmissionStatus.PENDING.value
    )
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    # What the last refusal was about (`stripe_gateway.ErrorScope`): `meter` and `customer` rows
    # follow the fixed configuration on their next send.
    last_error_scope: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow
    )
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Bumped after Stripe refused the row: the next send is a new request, same identifier.
    key_generation: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default=text("0")
    )

    @staticmethod
    def sent_values(now: datetime) -> dict[str, Any]:
        """The columns of a row Stripe took (the v1 and v2 senders' record)."""
        return {
            "status": SubmissionStatus.SENT.value,
            "attempts": UsageSubmission.attempts + 1,
            "last_error": None,
            "last_error_scope": None,
            "sent_at": now,
            "updated_at": now,
        }

    @property
    def idempotency_key(self) -> str:
        """Derived from the outbox row, so every retry of it is the same request to Stripe
        (until Stripe refuses it: a refusal may be replayed for the key, so the key moves on)."""
        key = f"billing-usage-{self.identifier}"
        return f"{key}-r{self.key_generation}" if self.key_generation else key

    __table_args__ = (
        Index(
            "ix_usage_submissions_unsent",
            "created_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        Index(
            "ix_usage_submissions_organization_id_window_start", "organization_id", "window_start"
        ),
        # Every flush counts the rows waiting for an operator; they are few, the outbox is not.
        Index(
            "ix_usage_submissions_awaiting_operator",
            "status",
            postgresql_where=text("status IN ('failed', 'held', 'rejected')"),
            sqlite_where=text("status IN ('failed', 'held', 'rejected')"),
        ),
        # The rows of one meter sent in a time window: what a meter error report can be about.
        Index(
            "ix_usage_submissions_sent_by_meter",
            "event_name",
            "sent_at",
            postgresql_where=text("status = 'sent'"),
            sqlite_where=text("status = 'sent'"),
        ),
    )


class UsageSubmissionAction(Base):
    """The audit trail of operator actions on outbox rows: what was there before, who, why."""

    __tablename__ = "usage_submission_actions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    submission_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("usage_submissions.id", ondelete="RESTRICT"), nullable=False
    )
    action: Mapped[str] = mapped_column(String(16), nullable=False)
    previous_status: Mapped[str] = mapped_column(String(16), nullable=False)
    new_status: Mapped[str] = mapped_column(String(16), nullable=False)
    previous_error: Mapped[str | None] = mapped_column(Text)
    previous_identifier: Mapped[str | None] = mapped_column(String(100))
    reason: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    __table_args__ = (
        Index("ix_usage_submission_actions_submission_id", "submission_id"),
        # A meter error report names the identifier that was sent; a row re-queued since has
        # a new one, and is found by its old one here.
        Index(
            "ix_usage_submission_actions_previous_identifier",
            "previous_identifier",
            postgresql_where=text("action = 'reissue'"),
            sqlite_where=text("action = 'reissue'"),
        ),
    )


class WebhookEvent(Base):
    """Every accepted Stripe delivery, stored once per Stripe event id."""

    __tablename__ = "webhook_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    stripe_event_id: Mapped[str] = mapped_column(String(255), nullable=False, unique=True)
    type: Mapped[str] = mapped_column(String(255), nullable=False)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    status: Mapped[str] = mapped_column(
        String(16), nullable=False, default=WebhookStatus.RECEIVED.value
    )
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_traceback: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow
    )

    __table_args__ = (Index("ix_webhook_events_status_received_at", "status", "received_at"),)


class EntitlementSource(enum.StrEnum):
    STRIPE = "stripe"  # mirrored from Stripe's active entitlements; replaced on every refresh
    MANUAL = "manual"  # granted by an operator; only `entitlements revoke` takes it away


class Entitlement(Base):
    """A feature (Stripe lookup key) an organization holds, one row per source.

    Access is any active row of any source, so a Stripe refresh (which rewrites only the `stripe`
    rows) never takes away what an operator granted by hand, and a manual revoke never hides what
    Stripe says the customer paid for.
    """

    __tablename__ = "entitlements"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    organization_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    lookup_key: Mapped[str] = mapped_column(String(80), nullable=False)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    source: Mapped[str] = mapped_column(
        String(64), nullable=False, default=EntitlementSource.STRIPE.value
    )
    note: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow
    )

    __table_args__ = (
        # Its leading columns serve the gate's lookup (organization_id, lookup_key).
        UniqueConstraint("organization_id", "lookup_key", "source"),
        CheckConstraint("source IN ('stripe', 'manual')", name="source_known"),
    )


class AdjustmentKind(enum.StrEnum):
    MINIMUM_COMMITMENT = "minimum_commitment"  # top metered usage up to this, every period
    CREDIT = "credit"  # one-off: taken off the next period invoice, then consumed


class BillingAdjustment(Base):
    """An organization's configured adjustment (`flask billing adjustments add`)."""

    __tablename__ = "billing_adjustments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    organization_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    amount_cents: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    # A credit is spent once: the invoice it went on (set in the transaction that plans it).
    consumed_invoice_id: Mapped[str | None] = mapped_column(String(255))
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    __table_args__ = (Index("ix_billing_adjustments_organization_id", "organization_id"),)


class InvoiceAdjustmentStatus(enum.StrEnum):
    PLANNED = "planned"  # amount fixed and stored; the invoice item may not exist yet
    APPLIED = "applied"  # the invoice item is on the draft (or nothing was due: amount 0)
    MISSED = "missed"  # the invoice was finalized first; a credit goes back to pending
    # A missed top-up an operator resolved: a pending item for the next invoice, or forgiven.
    CARRIED_OVER = "carried_over"
    WAIVED = "waived"


class InvoiceAdjustment(Base):
    """What one invoice.created applied to one invoice: at most one row per (invoice, adjustment),
    which is what makes a redelivered or replayed event apply nothing twice."""

    __tablename__ = "invoice_adjustments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    stripe_invoice_id: Mapped[str] = mapped_column(String(255), nullable=False)
    adjustment_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("billing_adjustments.id", ondelete="RESTRICT"), nullable=False
    )
    organization_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    # Signed as it appears on the invoice: a top-up is positive, a credit negative.
    amount_cents: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    metered_usage_cents: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(
        String(16), nullable=False, default=InvoiceAdjustmentStatus.PLANNED.value
    )
    stripe_invoice_item_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    applied_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A missed row's resolution (`adjustments carry-over|waive`): when, who, why.
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    resolved_by: Mapped[str | None] = mapped_column(String(255))
    resolution_note: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("stripe_invoice_id", "adjustment_id"),
        Index(
            "ix_invoice_adjustments_missed",
            "status",
            postgresql_where=text("status = 'missed'"),
            sqlite_where=text("status = 'missed'"),
        ),
    )

    @property
    def idempotency_key(self) -> str:
        """Fixed per (invoice, adjustment): a retried create is the same request to Stripe."""
        return f"billing-adjustment-{self.stripe_invoice_id}-{self.adjustment_id}"


class MeterErrorReport(Base):
    """A Stripe meter error report (`v1.billing.meter.error_report_triggered` or
    `v1.billing.meter.no_meter_found`), fetched in full and stored once per Stripe event id:
    what it said, which outbox rows its samples named, and (`reconciled_at`, `result`) whether
    the rows it did not sample have been looked for since (`error_count` can exceed the samples).
    """

    __tablename__ = "meter_error_reports"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    stripe_event_id: Mapped[str] = mapped_column(String(255), nullable=False, unique=True)
    type: Mapped[str] = mapped_column(String(255), nullable=False)
    meter_id: Mapped[str | None] = mapped_column(String(255))  # none for no_meter_found
    # The meter's event name (error_report_triggered), else the one the matched rows share.
    event_name: Mapped[str | None] = mapped_column(String(100))
    validation_start: Mapped[datetime | None] = mapped_column(UTCDateTime)
    validation_end: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error_count: Mapped[int] = mapped_column(Integer, nullable=False)
    sampled: Mapped[int] = mapped_column(Integer, nullable=False)  # samples in the report
    matched: Mapped[int] = mapped_column(Integer, nullable=False)  # samples naming an outbox row
    summary: Mapped[str | None] = mapped_column(Text)
    # [{code, message, request_identifier, submission_id, outcome}] as the samples were mapped.
    samples: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    # Set once nothing is left to look for: every error matched, or the window reconciled.
    reconciled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    __table_args__ = (
        # The reconciliation looks for the reports still to reconcile; they are few.
        Index(
            "ix_meter_error_reports_unreconciled",
            "validation_end",
            postgresql_where=text("reconciled_at IS NULL"),
            sqlite_where=text("reconciled_at IS NULL"),
        ),
    )


# Usage corrections (`billing.usage.corrections`, `billing.usage.correcting`) ---------------------

# Stripe's largest amount in a currency's minor unit (eight digits of major units): adjustments
# and the credits of usage corrections stay within it.
MAX_AMOUNT_CENTS = 99_999_999


class CorrectionStatus(enum.StrEnum):
    REQUESTED = "requested"  # recorded; the next flush plans it
    CANCELLING = "cancelling"  # cancels of the group's recent meter events asked of Stripe
    SENDING = "sending"  # its outbox row (restated total or correcting event) is not sent yet
    APPLIED = "applied"  # Stripe has it (or a credit waits for the next invoice): done
    FAILED = "failed"  # could not be applied as recorded (the error says why); nothing was sent
    HELD = "held"  # a cancel's outcome is unknown: reconcile (or an operator) settles it


# Not finished: every flush looks at these (a partial index keeps that cheap).
OPEN_CORRECTION_STATUSES = (
    CorrectionStatus.REQUESTED.value,
    CorrectionStatus.CANCELLING.value,
    CorrectionStatus.SENDING.value,
    CorrectionStatus.HELD.value,
)


class CorrectionMethod(enum.StrEnum):
    """How a correction reaches the bill, by the age of its hour (decided when the flush plans)."""

    # Received by Stripe < 24 h ago, period open: cancel those meter events, send the corrected
    # total under a new identifier.
    CANCEL_RESTATE = "cancel_restate"
    CORRECTING_EVENT = "correcting_event"  # older, period open: a meter event of value = delta
    CREDIT = "credit"  # the period was invoiced: a credit on the organization's next invoice


class CorrectionSource(enum.StrEnum):
    OPERATOR = "operator"  # `flask billing usage correct`
    UPSTREAM = "upstream"  # a `billable_event_corrections` row written by a producer


class CancelStatus(enum.StrEnum):
    REQUESTED = "requested"  # not yet answered by Stripe
    CANCELLED = "cancelled"
    REFUSED = "refused"  # Stripe refused it (e.g. past its 24 h): the event stays billed
    UNKNOWN = "unknown"  # refused after an attempt whose answer was lost: maybe cancelled


class UsageCorrection(Base):
    """A change to what an organization was billed for one (event type, hour): a record, never
    an edit. `delta` is by how much the billed total changes (negative retracts)."""

    __tablename__ = "usage_corrections"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), nullable=False, unique=True)
    source: Mapped[str] = mapped_column(String(16), nullable=False)
    organization_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    event_type: Mapped[str] = mapped_column(String(100), nullable=False)
    hour: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    delta: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    actor: Mapped[str] = mapped_column(String(255), nullable=False)
    status: Mapped[str] = mapped_column(
        String(16), nullable=False, default=CorrectionStatus.REQUESTED.value
    )
    method: Mapped[str | None] = mapped_column(String(32))
    # What the group was billed when the correction was recorded (delivered rows and earlier
    # corrections): a retraction may not take it below 0.
    billed_before: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # The outbox row it sends (the restated total, or the correcting event).
    submission_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("usage_submissions.id", ondelete="RESTRICT")
    )
    billing_adjustment_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("billing_adjustments.id", ondelete="RESTRICT")
    )
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow
    )
    applied_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        CheckConstraint("delta <> 0", name="delta_not_zero"),
        Index(
            "ix_usage_corrections_open",
            "status",
            postgresql_where=text("status IN ('requested', 'cancelling', 'sending', 'held')"),
            sqlite_where=text("status IN ('requested', 'cancelling', 'sending', 'held')"),
        ),
        Index("ix_usage_corrections_group", "organization_id", "event_type", "hour"),
        Index("ix_usage_corrections_submission_id", "submission_id"),
    )


class UsageCorrectionCancel(Base):
    """One meter event a correction asks Stripe to cancel (`cancel_restate`), and the answer."""

    __tablename__ = "usage_correction_cancels"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    correction_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("usage_corrections.id", ondelete="RESTRICT"), nullable=False
    )
    submission_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("usage_submissions.id", ondelete="RESTRICT"), nullable=False
    )
    # The meter event cancelled, as it was sent (the outbox row keeps its own).
    event_name: Mapped[str] = mapped_column(String(100), nullable=False)
    identifier: Mapped[str] = mapped_column(String(100), nullable=False)
    value: Mapped[int] = mapped_column(BigInteger, nullable=False)
    status: Mapped[str] = mapped_column(
        String(16), nullable=False, default=CancelStatus.REQUESTED.value
    )
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # Stripe replays an answer for the same idempotency key for at least 24 h after it: within
    # that of the first attempt, a refusal is a real one.
    first_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow
    )

    __table_args__ = (
        UniqueConstraint("correction_id", "submission_id"),
        Index("ix_usage_correction_cancels_submission_id", "submission_id"),
    )

    @property
    def idempotency_key(self) -> str:
        """Fixed per (correction, meter event): a repeated cancel is the same request."""
        return f"billing-cancel-{self.correction_id}-{self.identifier}"


class BillableEventCorrection(Base):
    """The upstream way in: a producer writes a correction with plain SQL (the contract in
    `billing.checks.contract`); the flush takes each pending row into `usage_corrections` once,
    or rejects it with a reason."""

    __tablename__ = "billable_event_corrections"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    organization_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    event_type: Mapped[str] = mapped_column(String(100), nullable=False)
    hour: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    # numeric, as billable_events.quantity: a producer's 1.5 is seen (and refused), not rounded.
    delta: Mapped[Decimal] = mapped_column(QUANTITY, nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    idempotency_key: Mapped[str] = mapped_column(String(255), nullable=False, unique=True)
    source: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, server_default=sa.func.current_timestamp()
    )
    # Billing-owned: the correction it became, or why it never will; a row is pending while both
    # are NULL.
    usage_correction_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("usage_corrections.id", ondelete="RESTRICT")
    )
    rejected_reason: Mapped[str | None] = mapped_column(Text)
    taken_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index(
            "ix_billable_event_corrections_pending",
            "id",
            postgresql_where=text("usage_correction_id IS NULL AND rejected_reason IS NULL"),
            sqlite_where=text("usage_correction_id IS NULL AND rejected_reason IS NULL"),
        ),
    )


def pending_correction(corrections: Any = None) -> sa.ColumnElement[bool]:
    """An upstream correction row the flush has neither taken nor rejected."""
    columns = (BillableEventCorrection.__table__ if corrections is None else corrections).c
    return sa.and_(columns.usage_correction_id.is_(None), columns.rejected_reason.is_(None))


def still_pending() -> sa.ColumnElement[bool]:
    """`status = 'pending'` for a statement that finds its outbox rows by primary key.

    Written so that no index answers it: with the plain comparison PostgreSQL could take the
    partial index of pending rows, which its statistics (older than the claim that just filled
    the outbox) put at a few rows, and read every pending row for each statement: 180-260 ms a
    1,000-row record with a million pending, so a backlog's records were quadratic (1M rows
    recorded in 120 s, inserted in 12 s); by primary key 22 ms, 1M in 27 s (docs/performance.md,
    "Claiming a million groups")."""
    return sa.func.coalesce(UsageSubmission.status, "") == SubmissionStatus.PENDING.value


def pending_among(ids: Sequence[int], dialect: str) -> sa.ColumnElement[bool]:
    """The outbox rows among `ids` (not empty) that are still pending, found by primary key (the
    id range narrows the key scan)."""
    submission = UsageSubmission
    return sa.and_(
        submission.id.between(min(ids), max(ids)),
        id_in(submission.id, ids, dialect),
        still_pending(),
    )


def begin_record(session: Session) -> str:
    """Set up a transaction that records send outcomes on outbox rows; returns the dialect.

    On PostgreSQL: no wait for the WAL flush (a record lost to a database crash leaves its rows
    pending, re-sent under the same identifiers, which Stripe dedupes); and no plan but the
    primary key's index scan, which walks `pending_among`'s sorted ids in key order, so the
    record takes its row locks in id order, as every other writer of the outbox does
    (`usage.rejections.mark_rejected`): a record and a meter error report's rejection of the
    same rows cannot deadlock. A seq or bitmap scan would visit them in heap order."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":  # one round trip: a record runs every 1,000 rows
        session.execute(
            sa.text(
                "SELECT set_config('synchronous_commit', 'off', true),"
                " set_config('enable_seqscan', 'off', true),"
                " set_config('enable_bitmapscan', 'off', true)"
            )
        )
    return dialect
