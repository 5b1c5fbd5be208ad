"""One function per Stripe event type. Each is idempotent and order-safe: state-like objects are
re-read from Stripe (through the gateway) before anything is written, so an old event arriving
late writes today's state, not its own; the account row is locked while that happens, so two
events of one subscription processed at once cannot interleave a stale read with a fresh write.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis.exceptions
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from billing import logs
from billing.adjustments import service as adjustments
from billing.entitlements.service import refresh_from_stripe
from billing.models import BillingAccount
from billing.runtime import Runtime
from billing.stripe_gateway import TransientStripeError, subscription_period
from billing.usage.result import TransientFlushError
from billing.webhooks.service import Handler

log = logs.get_logger("billing.webhooks.handlers")

LIVE_SUBSCRIPTION_STATUSES = frozenset({"active", "trialing", "past_due"})


class TransientHandlerError(Exception):
    """A handler met a condition that should clear by itself (retry with backoff)."""


class PermanentHandlerError(Exception):
    """A handler cannot succeed without an operator (dead letter, then `webhooks replay`)."""


# What the processing task retries with backoff; anything else is a dead letter at once.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TransientHandlerError,
    TransientStripeError,
    TransientFlushError,
    OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


def _object(event: Mapping[str, Any]) -> dict[str, Any]:
    return dict((event.get("data") or {}).get("object") or {})


def account_for_customer(
    session: Session, customer_id: str | None, *, lock: bool = False
) -> BillingAccount | None:
    if not customer_id:
        return None
    query = sa.select(BillingAccount).where(BillingAccount.stripe_customer_id == customer_id)
    return session.scalars(query.with_for_update() if lock else query).first()


def organization_for_customer(runtime: Runtime, customer_id: str | None) -> int | None:
    with runtime.session_factory() as session:
        account = account_for_customer(session, customer_id)
        organization_id = account.organization_id if account else None
    if organization_id is None:
        log.warning(logs.WEBHOOK_UNLINKED_CUSTOMER, extra={"stripe_customer_id": customer_id})
    return organization_id


# checkout.session.completed ---------------------------------------------------------------------


def on_checkout_completed(runtime: Runtime, event: Mapping[str, Any]) -> None:
    """Link the organization (`client_reference_id`) to the customer and subscription. Access is
    granted by the entitlements event, never by the checkout itself.

    The session is read back from Stripe: the delivery may be older than the session's state,
    and which organization gets the customer must come from Stripe, not from a payload."""
    checkout = runtime.stripe.retrieve_checkout_session(_object(event)["id"]).to_dict()
    organization_id = _organization_ref(checkout.get("client_reference_id"))
    customer_id = _id_of(checkout.get("customer"))
    subscription_id = _id_of(checkout.get("subscription"))
    if checkout.get("status") != "complete" or organization_id is None or not customer_id:
        log.warning(
            logs.WEBHOOK_UNLINKED_CUSTOMER,
            extra={
                "checkout_session": checkout.get("id"),
                "stripe_customer_id": customer_id,
                "client_reference_id": checkout.get("client_reference_id"),
                "checkout_status": checkout.get("status"),
            },
        )
        return
    link_account(runtime, organization_id, customer_id, subscription_id)
    if subscription_id:
        sync_subscription(runtime, subscription_id, customer_id)
    refresh_entitlements(runtime, organization_id)


def _id_of(value: Any) -> str | None:
    """An expandable field: an id, or the expanded object."""
    return value.get("id") if isinstance(value, dict) else value


def _organization_ref(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def link_account(
    runtime: Runtime, organization_id: int, customer_id: str, subscription_id: str | None
) -> None:
    try:
        with runtime.session_factory.begin() as session:
            owner = account_for_customer(session, customer_id, lock=True)
            if owner is not None and owner.organization_id != organization_id:
                raise PermanentHandlerError(
                    f"customer {customer_id} already belongs to organization "
                    f"{owner.organization_id}, not {organization_id}"
                )
            account = session.get(BillingAccount, organization_id, with_for_update=True)
            if account is None:
                account = BillingAccount(organization_id=organization_id)
                session.add(account)
            account.stripe_customer_id = customer_id
            if subscription_id:
                account.stripe_subscription_id = subscription_id
    except IntegrityError as error:
        # A concurrent first link of the same organization: the retry finds its row.
        raise TransientHandlerError(f"concurrent link of organization {organization_id}") from error
    log.info(
        logs.ACCOUNT_LINKED,
        extra={
            "organization_id": organization_id,
            "stripe_customer_id": customer_id,
            "stripe_subscription_id": subscription_id,
        },
    )


# customer.subscription.* ------------------------------------------------------------------------


def on_subscription_changed(runtime: Runtime, event: Mapping[str, Any]) -> None:
    subscription = _object(event)
    organization_id = sync_subscription(runtime, subscription["id"], subscription["customer"])
    if organization_id is not None:
        refresh_entitlements(runtime, organization_id)  # a safety net for missed summaries


def sync_subscription(runtime: Runtime, subscription_id: str, customer_id: str) -> int | None:
    """Write Stripe's current status and period of the subscription to its billing account."""
    with runtime.session_factory.begin() as session:
        account = account_for_customer(session, customer_id, lock=True)
        if account is None:
            log.warning(
                logs.WEBHOOK_UNLINKED_CUSTOMER,
                extra={
                    "stripe_customer_id": customer_id,
                    "stripe_subscription_id": subscription_id,
                },
            )
            return None
        # Read Stripe while holding the account row, so this write is never older than one
        # made concurrently for another event of the same subscription.
        subscription = runtime.stripe.retrieve_subscription(subscription_id)
        if not _tracks(account, subscription):
            return account.organization_id
        account.stripe_subscription_id = subscription.id
        account.subscription_status = subscription.status
        period = subscription_period(subscription)
        if period is not None:
            account.current_period_start, account.current_period_end = period
        organization_id = account.organization_id
    log.info(
        logs.SUBSCRIPTION_SYNCED,
        extra={
            "organization_id": organization_id,
            "stripe_subscription_id": subscription_id,
            "status": subscription.status,
        },
    )
    return organization_id


def _tracks(account: BillingAccount, subscription: Any) -> bool:
    """The account follows one subscription; a new live one replaces one that is over."""
    if account.stripe_subscription_id in (None, subscription.id):
        return True
    return (
        subscription.status in LIVE_SUBSCRIPTION_STATUSES
        and account.subscription_status not in LIVE_SUBSCRIPTION_STATUSES
    )


# entitlements.active_entitlement_summary.updated ---------------------------------------------


def on_entitlements_updated(runtime: Runtime, event: Mapping[str, Any]) -> None:
    organization_id = organization_for_customer(runtime, _object(event).get("customer"))
    if organization_id is not None:
        refresh_entitlements(runtime, organization_id)


def refresh_entitlements(runtime: Runtime, organization_id: int) -> None:
    """Replace the organization's Stripe-sourced entitlements with Stripe's active ones (manual
    grants are left alone; a Stripe error changes nothing and retries the event)."""
    refresh_from_stripe(runtime, organization_id)


# invoices and meter errors --------------------------------------------------------------------


def on_invoice_created(runtime: Runtime, event: Mapping[str, Any]) -> None:
    adjustments.on_invoice_created(runtime, _object(event)["id"])


def on_invoice_payment_failed(runtime: Runtime, event: Mapping[str, Any]) -> None:
    """Recorded (the stored event, `webhooks list --type invoice.payment_failed`) and logged."""
    invoice = _object(event)
    log.warning(
        logs.INVOICE_PAYMENT_FAILED,
        extra={
            "organization_id": organization_for_customer(runtime, invoice.get("customer")),
            "stripe_customer_id": invoice.get("customer"),
            "invoice_id": invoice.get("id"),
            "amount_due": invoice.get("amount_due"),
            "currency": invoice.get("currency"),
            "attempt_count": invoice.get("attempt_count"),
            "next_payment_attempt": invoice.get("next_payment_attempt"),
        },
    )


def on_meter_error_report(runtime: Runtime, event: Mapping[str, Any]) -> None:
    """A thin v2 event: Stripe refused meter events asynchronously (unknown customer, bad value,
    timestamp out of range). Logged for an operator; the outbox rows stay as they are."""
    related = event.get("related_object") or {}
    data = event.get("data") or {}
    log.warning(
        logs.METER_ERROR_REPORTED,
        extra={
            "meter_id": related.get("id"),
            "summary": (data.get("reason") or {}).get("error_types") or data.get("reason"),
            "validation_start": data.get("validation_start"),
            "validation_end": data.get("validation_end"),
        },
    )


HANDLERS: dict[str, Handler] = {
    "checkout.session.completed": on_checkout_completed,
    "customer.subscription.created": on_subscription_changed,
    "customer.subscription.updated": on_subscription_changed,
    "customer.subscription.deleted": on_subscription_changed,
    "entitlements.active_entitlement_summary.updated": on_entitlements_updated,
    "invoice.created": on_invoice_created,
    "invoice.payment_failed": on_invoice_payment_failed,
    "v1.billing.meter.error_report_triggered": on_meter_error_report,
}
