"""invoice.created: late usage first, then the organization's adjustments, once per invoice.

Stripe finalizes a subscription's draft invoice about an hour after we acknowledge
`invoice.created`. Within that hour this module (1) flushes the organization's unsent usage, so
usage of the closed period lands on this invoice, and (2) adds the configured adjustments as
invoice items: a minimum monthly commitment tops metered usage up to the minimum, and pending
one-off credits are taken off. Each (invoice, adjustment) pair is planned once, with its amount,
in `invoice_adjustments` before Stripe is called, and the invoice item is created with an
idempotency key of that pair (and looked for on the invoice first): a redelivered event, a retry
after a crash or a replay adds nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from billing import logs
from billing.models import (
    AdjustmentKind,
    BillingAccount,
    BillingAdjustment,
    InvoiceAdjustment,
    InvoiceAdjustmentStatus,
    SubmissionStatus,
    UsageSubmission,
    utcnow,
)
from billing.runtime import Runtime
from billing.stripe_gateway import PermanentStripeError
from billing.usage.corrections import credit_descriptions
from billing.usage.service import flush_pass

log = logs.get_logger("billing.webhooks.adjustments")

PERIOD_INVOICE_REASON = "subscription_cycle"
KEY_METADATA = "billing_adjustment_key"


class InvoiceGone(Exception):
    """Stripe has no such invoice (404): a draft deleted before invoice.created was processed.
    Nothing is wrong and nothing can be adjusted; the event is ignored with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@contextmanager
def _gone_on_404(fields: dict[str, Any]) -> Iterator[None]:
    try:
        yield
    except PermanentStripeError as error:
        if error.status != 404:
            raise
        reason = f"invoice {fields['invoice_id']} no longer exists (a deleted draft): {error}"
        _skip(fields, reason)
        raise InvoiceGone(reason) from error


@dataclass(frozen=True)
class AppliedAdjustments:
    invoice_id: str
    organization_id: int
    currency: str
    metered_usage_cents: int
    minimum_commitment_topup_cents: int = 0
    credit_cents: int = 0
    newly_applied: int = 0


# invoice.created --------------------------------------------------------------------------------


def on_invoice_created(runtime: Runtime, invoice_id: str) -> AppliedAdjustments | None:
    """Raises InvoiceGone when Stripe no longer has the invoice."""
    with _gone_on_404({"invoice_id": invoice_id}):
        invoice = runtime.stripe.retrieve_invoice(invoice_id)
    fields: dict[str, Any] = {"invoice_id": invoice_id, "stripe_customer_id": invoice.customer}
    organization_id = _organization(runtime, invoice.customer)
    if organization_id is None:
        return _skip(fields, "no billing account for the customer")
    fields["organization_id"] = organization_id
    # Whatever the invoice's state: unsent usage only grows older waiting.
    flush_late_usage(runtime, organization_id)
    if invoice.billing_reason != PERIOD_INVOICE_REASON:
        return _skip(fields, f"billing_reason {invoice.billing_reason} is not a period invoice")
    # Read again after the flush: a draft's metered lines follow the usage reported so far.
    with _gone_on_404(fields):
        invoice = runtime.stripe.retrieve_invoice(invoice_id)
        lines = [line.to_dict() for line in runtime.stripe.invoice_lines(invoice_id)]
    usage_cents = metered_usage_cents(runtime, organization_id, lines)
    if invoice.status != "draft":
        # Finalized before we got here (workers down or backlogged at renewal): what the period
        # owed is recorded as missed, for an operator, instead of vanishing.
        missed = plan_adjustments(runtime, organization_id, invoice, usage_cents, editable=False)
        for row in missed:
            _log_missed(row, f"invoice was {invoice.status} when invoice.created was processed")
        return _skip(
            fields, f"invoice is {invoice.status}, only drafts are adjusted; missed {len(missed)}"
        )
    planned = plan_adjustments(runtime, organization_id, invoice, usage_cents)
    result = apply_planned(runtime, invoice, organization_id, planned, lines, usage_cents)
    if result.newly_applied:
        log.info(
            logs.INVOICE_ADJUSTMENTS_APPLIED,
            extra={
                **fields,
                "currency": result.currency,
                "metered_usage_cents": result.metered_usage_cents,
                "minimum_commitment_topup_cents": result.minimum_commitment_topup_cents,
                "credit_cents": result.credit_cents,
                "adjustments_applied": result.newly_applied,
            },
        )
    return result


def _skip(fields: dict[str, Any], reason: str) -> None:
    log.info(logs.INVOICE_ADJUSTMENTS_SKIPPED, extra={**fields, "reason": reason})
    return None


def _organization(runtime: Runtime, customer_id: str) -> int | None:
    with runtime.session_factory() as session:
        return session.scalar(
            sa.select(BillingAccount.organization_id).where(
                BillingAccount.stripe_customer_id == customer_id
            )
        )


def flush_late_usage(runtime: Runtime, organization_id: int) -> None:
    """Send the organization's unsent usage now: hours are stamped inside the period they belong
    to, so usage of the closed period lands on this draft. Transient failures retry the event."""
    flush_pass(runtime, organization_id=organization_id).raise_if_transient()


def metered_usage_cents(runtime: Runtime, organization_id: int, lines: list[dict[str, Any]]) -> int:
    """The invoice's charges for metered prices (licensed fees and our own items excluded).

    Per metered line, the larger of Stripe's amount and the same price applied to the usage
    billing's outbox has sent for that meter in the line's period: Stripe aggregates meter events
    asynchronously, so a draft read right after the flush can lag it, and a minimum-commitment
    top-up computed from the lagging figure would overcharge.
    """
    prices: dict[str, Any] = {}
    meter_names: dict[str, str] | None = None
    total = 0
    for line in lines:
        if (line.get("parent") or {}).get("type") != "subscription_item_details":
            continue
        price_id = ((line.get("pricing") or {}).get("price_details") or {}).get("price")
        if not price_id:
            continue
        if price_id not in prices:
            prices[price_id] = runtime.stripe.retrieve_price(price_id)
        recurring = prices[price_id].recurring
        if not recurring or recurring.usage_type != "metered":
            continue
        if meter_names is None:
            meter_names = {meter.id: meter.event_name for meter in runtime.stripe.list_meters()}
        sent = _sent_quantity(
            runtime, organization_id, meter_names.get(recurring.meter or ""), line.get("period")
        )
        unit = Decimal(str(prices[price_id].unit_amount_decimal or 0))
        from_outbox = int((unit * sent).to_integral_value(ROUND_HALF_UP))
        total += max(int(line.get("amount") or 0), from_outbox)
    return total


def _sent_quantity(
    runtime: Runtime, organization_id: int, event_name: str | None, period: Any
) -> int:
    if not event_name or not period:
        return 0
    start = datetime.fromtimestamp(period["start"], UTC)
    end = datetime.fromtimestamp(period["end"], UTC)
    with runtime.session_factory() as session:
        return int(
            session.scalar(
                sa.select(sa.func.coalesce(sa.func.sum(UsageSubmission.value), 0)).where(
                    UsageSubmission.organization_id == organization_id,
                    UsageSubmission.event_name == event_name,
                    UsageSubmission.status == SubmissionStatus.SENT.value,
                    UsageSubmission.window_start >= start,
                    UsageSubmission.window_start < end,
                )
            )
        )


def plan_adjustments(
    runtime: Runtime, organization_id: int, invoice: Any, usage_cents: int, *, editable: bool = True
) -> list[InvoiceAdjustment]:
    """Fix, once, what each configured adjustment adds to this invoice; returns the rows still
    to apply. A credit is consumed in the same transaction, so no other invoice plans it.

    For an invoice no longer `editable` (finalized first) the rows are recorded `missed` and
    returned: a credit stays pending for the next invoice, a top-up waits for an operator."""
    with runtime.session_factory.begin() as session:
        planned_ids = set(
            session.scalars(
                sa.select(InvoiceAdjustment.adjustment_id).where(
                    InvoiceAdjustment.stripe_invoice_id == invoice.id
                )
            )
        )
        added: list[InvoiceAdjustment] = []
        for adjustment in _applicable(session, organization_id, invoice.id):
            if adjustment.id in planned_ids:
                continue
            if adjustment.currency != invoice.currency:
                log.warning(
                    logs.INVOICE_ADJUSTMENTS_SKIPPED,
                    extra={
                        "invoice_id": invoice.id,
                        "organization_id": organization_id,
                        "adjustment_id": adjustment.id,
                        "reason": f"currency {adjustment.currency} != {invoice.currency}",
                    },
                )
                continue
            row = _plan_one(adjustment, invoice, usage_cents, editable=editable)
            session.add(row)
            added.append(row)
        planned = list(
            session.scalars(
                sa.select(InvoiceAdjustment).where(
                    InvoiceAdjustment.stripe_invoice_id == invoice.id,
                    InvoiceAdjustment.status == InvoiceAdjustmentStatus.PLANNED.value,
                )
            )
        )
        if editable:
            return planned
        for row in planned:  # planned by an earlier attempt, while it was still a draft
            _set_missed(session, row)
        return planned + [r for r in added if r.status == InvoiceAdjustmentStatus.MISSED.value]


def _applicable(session: Session, organization_id: int, invoice_id: str) -> list[BillingAdjustment]:
    return list(
        session.scalars(
            sa.select(BillingAdjustment)
            .where(
                BillingAdjustment.organization_id == organization_id,
                BillingAdjustment.removed_at.is_(None),
                sa.or_(
                    BillingAdjustment.kind == AdjustmentKind.MINIMUM_COMMITMENT.value,
                    BillingAdjustment.consumed_invoice_id.is_(None),
                    BillingAdjustment.consumed_invoice_id == invoice_id,
                ),
            )
            .order_by(BillingAdjustment.id)
            .with_for_update()
        )
    )


def _plan_one(
    adjustment: BillingAdjustment, invoice: Any, usage_cents: int, *, editable: bool
) -> InvoiceAdjustment:
    if adjustment.kind == AdjustmentKind.CREDIT:
        if editable:  # a credit that missed this invoice stays pending for the next one
            adjustment.consumed_invoice_id = invoice.id
        amount = -adjustment.amount_cents
    else:
        amount = max(0, adjustment.amount_cents - usage_cents)
    # Nothing to add (usage met the minimum): recorded as applied, with no invoice item.
    if not amount:
        status = InvoiceAdjustmentStatus.APPLIED
    elif editable:
        status = InvoiceAdjustmentStatus.PLANNED
    else:
        status = InvoiceAdjustmentStatus.MISSED
    return InvoiceAdjustment(
        stripe_invoice_id=invoice.id,
        adjustment_id=adjustment.id,
        organization_id=adjustment.organization_id,
        kind=adjustment.kind,
        amount_cents=amount,
        currency=adjustment.currency,
        metered_usage_cents=usage_cents,
        status=status.value,
        applied_at=None if amount else utcnow(),
    )


def apply_planned(
    runtime: Runtime,
    invoice: Any,
    organization_id: int,
    planned: list[InvoiceAdjustment],
    lines: list[dict[str, Any]],
    usage_cents: int,
) -> AppliedAdjustments:
    on_invoice = {(line.get("metadata") or {}).get(KEY_METADATA): line for line in lines}
    topup = credit = applied = 0
    for row in planned:
        existing = on_invoice.get(row.idempotency_key)
        try:
            item_id = _item_id(existing) if existing else _create_item(runtime, invoice, row)
        except PermanentStripeError as error:
            if error.code != "invoice_not_editable":
                raise
            _mark_missed(runtime, row, str(error))
            continue
        _mark_applied(runtime, row, item_id)
        applied += 1
        if row.kind == AdjustmentKind.CREDIT:
            credit += -row.amount_cents
        else:
            topup += row.amount_cents
    return AppliedAdjustments(
        invoice_id=invoice.id,
        organization_id=organization_id,
        currency=invoice.currency,
        metered_usage_cents=usage_cents,
        minimum_commitment_topup_cents=topup,
        credit_cents=credit,
        newly_applied=applied,
    )


def _item_id(line: dict[str, Any]) -> str | None:
    return ((line.get("parent") or {}).get("invoice_item_details") or {}).get("invoice_item")


def _create_item(runtime: Runtime, invoice: Any, row: InvoiceAdjustment) -> str:
    if row.kind == AdjustmentKind.CREDIT:
        description = credit_line(runtime, row.adjustment_id)
    else:
        description = (
            f"Minimum monthly commitment top-up (metered usage {row.metered_usage_cents} of "
            f"{row.metered_usage_cents + row.amount_cents} {row.currency.upper()} cents)"
        )
    item = runtime.stripe.add_invoice_item(
        invoice.customer,
        invoice_id=invoice.id,
        amount_cents=row.amount_cents,
        currency=row.currency,
        description=description,
        metadata={
            KEY_METADATA: row.idempotency_key,
            "billing_adjustment_id": str(row.adjustment_id),
            "billing_adjustment_kind": row.kind,
        },
        idempotency_key=row.idempotency_key,
    )
    return str(item.id)


def _mark_applied(runtime: Runtime, row: InvoiceAdjustment, item_id: str | None) -> None:
    with runtime.session_factory.begin() as session:
        session.execute(
            sa.update(InvoiceAdjustment)
            .where(InvoiceAdjustment.id == row.id)
            .values(
                status=InvoiceAdjustmentStatus.APPLIED.value,
                stripe_invoice_item_id=item_id,
                applied_at=utcnow(),
            )
        )


def _mark_missed(runtime: Runtime, row: InvoiceAdjustment, error: str) -> None:
    """The invoice was finalized before the item went on: a credit waits for the next one."""
    with runtime.session_factory.begin() as session:
        _set_missed(session, row)
    _log_missed(row, error)


def _set_missed(session: Session, row: InvoiceAdjustment) -> None:
    session.execute(
        sa.update(InvoiceAdjustment)
        .where(InvoiceAdjustment.id == row.id)
        .values(status=InvoiceAdjustmentStatus.MISSED.value)
    )
    row.status = InvoiceAdjustmentStatus.MISSED.value
    session.execute(
        sa.update(BillingAdjustment)
        .where(
            BillingAdjustment.id == row.adjustment_id,
            BillingAdjustment.consumed_invoice_id == row.stripe_invoice_id,
        )
        .values(consumed_invoice_id=None)
    )


def _log_missed(row: InvoiceAdjustment, error: str) -> None:
    log.error(
        logs.INVOICE_ADJUSTMENT_MISSED,
        extra={
            "invoice_id": row.stripe_invoice_id,
            "organization_id": row.organization_id,
            "adjustment_id": row.adjustment_id,
            "kind": row.kind,
            "amount_cents": row.amount_cents,
            "error": error,
        },
    )


def credit_line(runtime: Runtime, adjustment_id: int) -> str:
    """A credit's invoice line: a usage correction's says which and why, any other "Credit"."""
    with runtime.session_factory() as session:
        found = credit_descriptions(session, [adjustment_id])
    return found[adjustment_id][1] if adjustment_id in found else "Credit"
