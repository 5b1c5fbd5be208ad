"""The configured adjustments, as an operator manages them: `flask billing adjustments
add|list|remove`, and the missed top-ups an operator carries over to the next invoice or waives.
What each invoice received is decided on `invoice.created` (`billing.adjustments.invoice`)."""

from __future__ import annotations

from typing import Any

import pycountry
import sqlalchemy as sa
from sqlalchemy.orm import Session

from billing import logs
from billing.adjustments.invoice import KEY_METADATA
from billing.errors import OperatorError
from billing.models import (
    MAX_AMOUNT_CENTS,
    AdjustmentKind,
    BillingAccount,
    BillingAdjustment,
    InvoiceAdjustment,
    InvoiceAdjustmentStatus,
    utcnow,
)
from billing.runtime import Runtime
from billing.usage.corrections import credit_descriptions

log = logs.get_logger("billing.webhooks.adjustments")


class AdjustmentError(ValueError, OperatorError):
    """An adjustments command that cannot be carried out as asked."""


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
        # Credits that usage corrections made say which correction, and their invoice line.
        corrections = credit_descriptions(session, [a.id for a in adjustments])
    listed = []
    for a in adjustments:
        shown = _adjustment_dict(a, [x for x in applications if x.adjustment_id == a.id])
        correction_id, description = corrections.get(a.id, (None, None))
        listed.append({**shown, "usage_correction_id": correction_id, "description": description})
    return listed


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
