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

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pycountry
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

log = logs.get_logger("billing.webhooks.adjustments")

PERIOD_INVOICE_REASON = "subscription_cycle"
KEY_METADATA = "billing_adjustment_key"
# Stripe's largest amount in a currency's minor unit (eight digits of major units).
MAX_AMOUNT_CENTS = 99_999_999


class AdjustmentError(ValueError):
    """An adjustments command that cannot be carried out as asked."""


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
    from billing.usage.service import flush_once

    flush_once(runtime, organization_id=organization_id).raise_if_transient()


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
        description = "Credit"
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


# `flask billing adjustments add|list|remove` ----------------------------------------------------


def add_adjustment(
    runtime: Runtime, organization_id: int, kind: str, amount_cents: int, currency: str
) -> dict[str, Any]:
    currency = currency.lower()
    if amount_cents <= 0:
        raise AdjustmentError("--amount-cents must be a whole number above 0")
    if amount_cents > MAX_AMOUNT_CENTS:
        raise AdjustmentError(
            f"--amount-cents must be at most {MAX_AMOUNT_CENTS} (Stripe's largest amount)"
        )
    if len(currency) != 3 or pycountry.currencies.get(alpha_3=currency.upper()) is None:
        raise AdjustmentError(f"--currency must be an ISO 4217 currency code, got {currency!r}")
    with runtime.session_factory.begin() as session:
        # A typo in --org-id would otherwise wait, unnoticed, for an invoice that never comes.
        if session.get(BillingAccount, organization_id) is None:
            raise AdjustmentError(
                f"organization {organization_id} has no billing account: nothing to adjust"
            )
        if kind == AdjustmentKind.MINIMUM_COMMITMENT and session.scalar(
            sa.select(BillingAdjustment.id).where(
                BillingAdjustment.organization_id == organization_id,
                BillingAdjustment.kind == kind,
                BillingAdjustment.currency == currency,
                BillingAdjustment.removed_at.is_(None),
            )
        ):
            raise AdjustmentError(
                f"organization {organization_id} already has a {currency} minimum commitment; "
                "remove it first"
            )
        adjustment = BillingAdjustment(
            organization_id=organization_id,
            kind=kind,
            amount_cents=amount_cents,
            currency=currency,
        )
        session.add(adjustment)
        session.flush()
        return _adjustment_dict(adjustment, [])


def list_adjustments(
    runtime: Runtime,
    organization_id: int | None = None,
    include_removed: bool = False,
    *,
    missed_only: bool = False,
) -> list[dict[str, Any]]:
    query = sa.select(BillingAdjustment).order_by(BillingAdjustment.id)
    if organization_id is not None:
        query = query.where(BillingAdjustment.organization_id == organization_id)
    if missed_only:  # removed or not: a missed top-up waits for an operator either way
        query = query.where(
            BillingAdjustment.id.in_(
                sa.select(InvoiceAdjustment.adjustment_id).where(
                    InvoiceAdjustment.status == InvoiceAdjustmentStatus.MISSED.value
                )
            )
        )
    elif not include_removed:
        query = query.where(BillingAdjustment.removed_at.is_(None))
    with runtime.session_factory() as session:
        adjustments = list(session.scalars(query))
        applications = list(
            session.scalars(
                sa.select(InvoiceAdjustment)
                .where(InvoiceAdjustment.adjustment_id.in_([a.id for a in adjustments]))
                .order_by(InvoiceAdjustment.id)
            )
        )
    return [
        _adjustment_dict(a, [x for x in applications if x.adjustment_id == a.id])
        for a in adjustments
    ]


def remove_adjustments(
    runtime: Runtime,
    *,
    adjustment_id: int | None = None,
    organization_id: int | None = None,
    kind: str | None = None,
) -> list[int]:
    """Stop applying adjustments (kept, marked removed, with what they already applied)."""
    query = sa.select(BillingAdjustment).where(BillingAdjustment.removed_at.is_(None))
    if adjustment_id is not None:
        query = query.where(BillingAdjustment.id == adjustment_id)
    if organization_id is not None:
        query = query.where(BillingAdjustment.organization_id == organization_id)
    if kind is not None:
        query = query.where(BillingAdjustment.kind == kind)
    with runtime.session_factory.begin() as session:
        found = list(session.scalars(query.with_for_update()))
        if not found:
            raise AdjustmentError("no matching active adjustment")
        spent = [a for a in found if a.kind == AdjustmentKind.CREDIT and a.consumed_invoice_id]
        if spent and adjustment_id is not None:
            raise AdjustmentError(
                f"credit {adjustment_id} was already applied to {spent[0].consumed_invoice_id}"
            )
        removed = [a for a in found if a not in spent]
        for adjustment in removed:
            adjustment.removed_at = utcnow()
        return [a.id for a in removed]


def carry_over_missed(runtime: Runtime, row_id: int, *, actor: str) -> dict[str, Any]:
    """Bill a missed top-up on the customer's next invoice: a pending invoice item, created once
    (its idempotency key is the row's), then the row is `carried_over`."""
    with runtime.session_factory.begin() as session:
        row = _missed_topup(session, row_id)
        customer_id = session.scalar(
            sa.select(BillingAccount.stripe_customer_id).where(
                BillingAccount.organization_id == row.organization_id
            )
        )
        if not customer_id:
            raise AdjustmentError(
                f"organization {row.organization_id} has no Stripe customer to bill it to"
            )
        # Inside the row's lock: a concurrent carry-over waits, then finds the row resolved.
        item = runtime.stripe.add_invoice_item(
            customer_id,
            invoice_id=None,
            amount_cents=row.amount_cents,
            currency=row.currency,
            description=(
                f"Minimum monthly commitment top-up missed on invoice {row.stripe_invoice_id} "
                f"(metered usage {row.metered_usage_cents} of "
                f"{(row.metered_usage_cents or 0) + row.amount_cents} "
                f"{row.currency.upper()} cents)"
            ),
            metadata={
                KEY_METADATA: f"{row.idempotency_key}-carried",
                "billing_adjustment_id": str(row.adjustment_id),
                "billing_adjustment_kind": row.kind,
                "billing_missed_invoice": row.stripe_invoice_id,
            },
            idempotency_key=f"{row.idempotency_key}-carried",
        )
        _resolve(row, InvoiceAdjustmentStatus.CARRIED_OVER, actor, None)
        row.stripe_invoice_item_id = str(item.id)
        return _application_dict(row)


def waive_missed(runtime: Runtime, row_id: int, *, reason: str, actor: str) -> dict[str, Any]:
    """Forgive a missed top-up: never billed; who and why are kept."""
    if not reason.strip():
        raise AdjustmentError("waiving needs a reason (--reason TEXT)")
    with runtime.session_factory.begin() as session:
        row = _missed_topup(session, row_id)
        _resolve(row, InvoiceAdjustmentStatus.WAIVED, actor, reason.strip())
        return _application_dict(row)


def _missed_topup(session: Session, row_id: int) -> InvoiceAdjustment:
    row = session.get(InvoiceAdjustment, row_id, with_for_update=True)
    if row is None:
        raise AdjustmentError(f"invoice adjustment {row_id} does not exist")
    if row.kind == AdjustmentKind.CREDIT:
        raise AdjustmentError(
            f"invoice adjustment {row_id} is a credit: a missed credit stays pending and goes on "
            "the next invoice by itself"
        )
    if row.status != InvoiceAdjustmentStatus.MISSED:
        raise AdjustmentError(f"invoice adjustment {row_id} is {row.status}, not missed")
    return row


def _resolve(
    row: InvoiceAdjustment, status: InvoiceAdjustmentStatus, actor: str, note: str | None
) -> None:
    row.status = status.value
    row.resolved_at = utcnow()
    row.resolved_by = actor
    row.resolution_note = note
    log.warning(
        logs.INVOICE_ADJUSTMENT_RESOLVED,
        extra={
            "invoice_id": row.stripe_invoice_id,
            "organization_id": row.organization_id,
            "adjustment_id": row.adjustment_id,
            "amount_cents": row.amount_cents,
            "resolution": status.value,
            "actor": actor,
            "reason": note,
        },
    )


def _application_dict(row: InvoiceAdjustment) -> dict[str, Any]:
    return {
        "id": row.id,
        "invoice_id": row.stripe_invoice_id,
        "kind": row.kind,
        "amount_cents": row.amount_cents,
        "metered_usage_cents": row.metered_usage_cents,
        "status": row.status,
        "invoice_item_id": row.stripe_invoice_item_id,
        "resolved_at": row.resolved_at,
        "resolved_by": row.resolved_by,
        "resolution_note": row.resolution_note,
    }


def _adjustment_dict(
    adjustment: BillingAdjustment, applications: list[InvoiceAdjustment]
) -> dict[str, Any]:
    return {
        "id": adjustment.id,
        "organization_id": adjustment.organization_id,
        "kind": adjustment.kind,
        "amount_cents": adjustment.amount_cents,
        "currency": adjustment.currency,
        "pending": adjustment.kind == AdjustmentKind.MINIMUM_COMMITMENT
        or adjustment.consumed_invoice_id is None,
        "removed_at": adjustment.removed_at,
        "applied": [_application_dict(x) for x in applications],
    }
