"""One function per Stripe event type, and the table that maps a type to it (`HANDLERS`). Each is
a thin adapter over its feature (accounts, entitlements, adjustments, usage rejections),
idempotent and order-safe: state-like objects are re-read from Stripe before anything is written.
An error in `TRANSIENT_ERRORS` is retried with backoff; `service.EventIgnored` ends the event
`ignored` with its reason; any other is a dead letter for `webhooks replay`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis.exceptions
from sqlalchemy.exc import IntegrityError, OperationalError

from billing import accounts, logs
from billing.adjustments import invoice
from billing.entitlements.service import refresh_from_stripe
from billing.runtime import Runtime
from billing.stripe_gateway import TransientStripeError
from billing.usage import rejections
from billing.usage.result import TransientFlushError
from billing.webhooks.service import EventIgnored, Handler

log = logs.get_logger("billing.webhooks.handlers")


class TransientHandlerError(Exception):
    """A handler met a condition that should clear by itself (retry with backoff)."""


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
    try:
        accounts.link_account(runtime, organization_id, customer_id, subscription_id)
    except IntegrityError as error:
        # A concurrent first link of the same organization: the retry finds its row.
        raise TransientHandlerError(f"concurrent link of organization {organization_id}") from error
    if subscription_id:
        accounts.sync_subscription(runtime, subscription_id, customer_id)
    refresh_entitlements(runtime, organization_id)


def _id_of(value: Any) -> str | None:
    """An expandable field: an id, or the expanded object."""
    return value.get("id") if isinstance(value, dict) else value


def _organization_ref(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


# customer.subscription.* ------------------------------------------------------------------------


def on_subscription_changed(runtime: Runtime, event: Mapping[str, Any]) -> None:
    subscription = _object(event)
    organization_id = accounts.sync_subscription(
        runtime, subscription["id"], subscription["customer"]
    )
    if organization_id is not None:
        refresh_entitlements(runtime, organization_id)  # a safety net for missed summaries


# entitlements.active_entitlement_summary.updated ---------------------------------------------


def on_entitlements_updated(runtime: Runtime, event: Mapping[str, Any]) -> None:
    organization_id = accounts.organization_for_customer(runtime, _object(event).get("customer"))
    if organization_id is not None:
        refresh_entitlements(runtime, organization_id)


def refresh_entitlements(runtime: Runtime, organization_id: int) -> None:
    """Replace the organization's Stripe-sourced entitlements with Stripe's active ones (manual
    grants are left alone; a Stripe error changes nothing and retries the event)."""
    refresh_from_stripe(runtime, organization_id)


# invoices and meter errors --------------------------------------------------------------------


def on_invoice_created(runtime: Runtime, event: Mapping[str, Any]) -> None:
    try:
        invoice.on_invoice_created(runtime, _object(event)["id"])
    except invoice.InvoiceGone as gone:  # nothing is wrong, and nothing can be adjusted
        raise EventIgnored(gone.reason) from gone


def on_invoice_payment_failed(runtime: Runtime, event: Mapping[str, Any]) -> None:
    """Recorded (the stored event, `webhooks list --type invoice.payment_failed`) and logged."""
    invoice = _object(event)
    log.warning(
        logs.INVOICE_PAYMENT_FAILED,
        extra={
            "organization_id": accounts.organization_for_customer(runtime, invoice.get("customer")),
            "stripe_customer_id": invoice.get("customer"),
            "invoice_id": invoice.get("id"),
            "amount_due": invoice.get("amount_due"),
            "currency": invoice.get("currency"),
            "attempt_count": invoice.get("attempt_count"),
            "next_payment_attempt": invoice.get("next_payment_attempt"),
        },
    )


def on_meter_error_report(runtime: Runtime, event: Mapping[str, Any]) -> None:
    """A thin v2 event (`error_report_triggered`, `no_meter_found`): Stripe refused meter events
    it had accepted (unknown customer, bad value, inactive or unknown meter, timestamp out of
    range). The delivery carries no details: the full event is fetched (a 5xx retries, a 404 is a
    dead letter), and the outbox rows its samples name become `rejected`."""
    report = runtime.stripe.fetch_meter_error_report(event)
    rejections.record_report(runtime, report)


HANDLERS: dict[str, Handler] = {
    "checkout.session.completed": on_checkout_completed,
    "customer.subscription.created": on_subscription_changed,
    "customer.subscription.updated": on_subscription_changed,
    "customer.subscription.deleted": on_subscription_changed,
    "entitlements.active_entitlement_summary.updated": on_entitlements_updated,
    "invoice.created": on_invoice_created,
    "invoice.payment_failed": on_invoice_payment_failed,
    "v1.billing.meter.error_report_triggered": on_meter_error_report,
    "v1.billing.meter.no_meter_found": on_meter_error_report,
}
