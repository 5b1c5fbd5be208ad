"""Handlers end to end: the emulator signs and delivers over HTTP, a real worker processes, the
handlers read Stripe (the emulator) back and write billing_accounts and entitlements."""

from __future__ import annotations

import json

import sqlalchemy as sa

from billing import logs
from billing.entitlements import SAAS_FEATURE
from billing.models import BillingAccount, Entitlement, MeterErrorReport, UsageSubmission
from billing.stripe_gateway import SubscriptionCheckout
from billing.usage.service import flush_pass
from tests.factories import add_accounts, add_events, random_events
from tests.fixtures.webhooks import post, rows, wait_until


def account(runtime, organization_id: int) -> BillingAccount | None:
    with runtime.session_factory() as session:
        return session.get(BillingAccount, organization_id)


def active_features(runtime, organization_id: int) -> set[str]:
    with runtime.session_factory() as session:
        return set(
            session.scalars(
                sa.select(Entitlement.lookup_key).where(
                    Entitlement.organization_id == organization_id,
                    Entitlement.active.is_(True),
                )
            )
        )


def saas_checkout(stripe, organization_id: int, price: str | None = None):
    price = price or stripe.ensure_feature_price(
        SAAS_FEATURE, product_name="Workspace", unit_amount=4900
    )
    return stripe.create_subscription_checkout(
        SubscriptionCheckout(
            organization_id=organization_id,
            price_id=price,
            success_url="http://app/ok",
            cancel_url="http://app/no",
        )
    )


def test_checkout_links_the_organization_and_entitlements_follow_the_subscription(
    delivering, webhook_runtime, emulator
):
    stripe = webhook_runtime.stripe
    checkout = saas_checkout(stripe, 42)
    completed = emulator.control("POST", f"checkout_sessions/{checkout.id}/complete", {})
    final = delivering.settle()
    assert set(final.values()) <= {"processed", "ignored"}
    linked = account(webhook_runtime, 42)
    assert (linked.stripe_customer_id, linked.stripe_subscription_id) == (
        completed["customer"],
        completed["subscription"],
    )
    subscription = stripe.retrieve_subscription(completed["subscription"])
    item = subscription["items"].data[0]
    assert linked.subscription_status == "active"
    assert int(linked.current_period_start.timestamp()) == item.current_period_start
    assert int(linked.current_period_end.timestamp()) == item.current_period_end
    assert active_features(webhook_runtime, 42) == {SAAS_FEATURE}

    stripe.client.v1.subscriptions.cancel(completed["subscription"])
    delivering.settle()
    assert account(webhook_runtime, 42).subscription_status == "canceled"
    assert active_features(webhook_runtime, 42) == set()


def test_checkout_links_what_stripe_says_not_what_the_payload_says(
    delivering, webhook_runtime, emulator
):
    """A delivery's object is a snapshot, and a signed body is only as trustworthy as the secret:
    the organization and customer come from the session Stripe holds now."""
    stripe = webhook_runtime.stripe
    checkout = saas_checkout(stripe, 42)
    completed = emulator.control("POST", f"checkout_sessions/{checkout.id}/complete", {})
    delivering.settle()
    tampered = {
        "id": "evt_tampered_checkout",
        "object": "event",
        "type": "checkout.session.completed",
        "data": {
            "object": {
                "id": checkout.id,
                "object": "checkout.session",
                "client_reference_id": "666",
                "customer": "cus_other",
                "status": "complete",
            }
        },
    }
    assert post(delivering.url, json.dumps(tampered).encode()).status_code == 200
    assert delivering.settle()["evt_tampered_checkout"] == "processed"
    assert account(webhook_runtime, 666) is None
    assert account(webhook_runtime, 42).stripe_customer_id == completed["customer"]

    # A session still open (never paid) links nothing, whatever its delivery claims.
    unpaid = saas_checkout(stripe, 43)
    early = {
        **tampered,
        "id": "evt_open_checkout",
        "data": {
            "object": {
                "id": unpaid.id,
                "object": "checkout.session",
                "client_reference_id": "43",
                "customer": "cus_43",
            }
        },
    }
    assert post(delivering.url, json.dumps(early).encode()).status_code == 200
    assert delivering.settle()["evt_open_checkout"] == "processed"
    assert account(webhook_runtime, 43) is None


def test_out_of_order_subscription_updates_end_in_the_newest_state(
    delivering, webhook_runtime, emulator
):
    stripe = webhook_runtime.stripe
    price = stripe.ensure_feature_price(SAAS_FEATURE, product_name="Workspace", unit_amount=4900)
    customer = stripe.create_customer("Org 7", 7)
    with webhook_runtime.session_factory.begin() as session:
        session.add(BillingAccount(organization_id=7, stripe_customer_id=customer.id))
    # Hold every delivery, then send them newest first: "deleted" arrives before the updates.
    delivering.configure(order="reverse", hold_ms=600)
    subscription = stripe.client.v1.subscriptions.create(
        {"customer": customer.id, "items": [{"price": price}]}
    )
    for n in range(3):
        stripe.client.v1.subscriptions.update(subscription.id, {"metadata": {"n": str(n)}})
    stripe.client.v1.subscriptions.cancel(subscription.id)
    delivering.settle()
    delivered = [
        d["type"] for d in delivering.deliveries() if d["type"].startswith("customer.subscription")
    ]
    assert delivered[0] == "customer.subscription.deleted"
    assert delivered[-1] == "customer.subscription.created"
    final = account(webhook_runtime, 7)
    assert (final.stripe_subscription_id, final.subscription_status) == (
        subscription.id,
        "canceled",
    )
    assert active_features(webhook_runtime, 7) == set()

    # A stale "active" update replayed long after: the handler reads Stripe, not the payload.
    stale = {
        "id": "evt_stale",
        "object": "event",
        "type": "customer.subscription.updated",
        "data": {
            "object": {
                "id": subscription.id,
                "object": "subscription",
                "customer": customer.id,
                "status": "active",
            }
        },
    }
    assert post(delivering.url, json.dumps(stale).encode()).status_code == 200
    delivering.settle()
    assert account(webhook_runtime, 7).subscription_status == "canceled"


def test_a_failed_payment_is_recorded_with_a_warning(delivering, webhook_runtime, captured):
    failed = {
        "id": "evt_payfail",
        "object": "event",
        "type": "invoice.payment_failed",
        "data": {
            "object": {
                "id": "in_1",
                "object": "invoice",
                "customer": "cus_x",
                "amount_due": 4900,
                "currency": "usd",
                "attempt_count": 2,
            }
        },
    }
    assert post(delivering.url, json.dumps(failed).encode()).status_code == 200
    assert delivering.settle() == {"evt_payfail": "processed"}
    (payment,) = captured.messages(logs.INVOICE_PAYMENT_FAILED)
    assert payment.levelname == "WARNING"
    assert (payment.event_id, payment.invoice_id, payment.amount_due) == (
        "evt_payfail",
        "in_1",
        4900,
    )


# Meter error reports: the thin event's details are fetched ------------------------------------


def _rejected_usage(runtime, emulator, organization_id: int) -> set[int]:
    """One organization's sent usage whose customer Stripe deleted: its report is on its way."""
    emulator.settings(meter_validation="async", error_report_delay_seconds=1)
    customers = add_accounts(runtime, [organization_id])
    add_events(runtime, random_events([organization_id], ["api_call"], 3, hours=2))
    runtime.stripe.client.v1.customers.delete(customers[organization_id])
    assert flush_pass(runtime).submissions_sent
    with runtime.session_factory() as session:
        return set(session.scalars(sa.select(UsageSubmission.id)))


def _statuses_of_rows(runtime) -> set[str]:
    with runtime.session_factory() as session:
        return set(session.scalars(sa.select(UsageSubmission.status)))


def test_a_5xx_fetching_the_report_is_retried_until_it_is_read(
    delivering, webhook_runtime, emulator, retries
):
    _rejected_usage(webhook_runtime, emulator, 71)
    # More 500s than stripe-python's own retries of one fetch: the task retries too.
    calls = webhook_runtime.settings.stripe_max_network_retries + 1
    emulator.faults({"path": "/v2/core/events", "status": 500, "count": calls + 1})
    wait_until(lambda: _statuses_of_rows(webhook_runtime) == {"rejected"}, what="the rejection")
    delivering.settle()
    (stored,) = [e for e in rows(webhook_runtime) if e.type.startswith("v1.billing.meter.")]
    assert (stored.status, stored.attempts) == ("processed", 2)
    assert retries and all("APIError" in reason for reason in retries)


def test_a_report_stripe_does_not_have_is_a_dead_letter_not_processed(
    delivering, webhook_runtime, emulator, captured
):
    thin = {
        "id": "evt_test_65R0000000000000000000000000000000000000000",
        "object": "v2.core.event",
        "type": "v1.billing.meter.error_report_triggered",
        "created": "2026-12-02T17:46:22.134Z",
        "livemode": False,
        "context": None,
        "reason": None,
        "related_object": {
            "id": "mtr_test_unknown",
            "type": "billing.meter",
            "url": "/v1/billing/meters/mtr_test_unknown",
        },
    }
    assert post(delivering.url, json.dumps(thin).encode()).status_code == 200
    assert delivering.settle() == {thin["id"]: "failed"}
    (stored,) = rows(webhook_runtime)
    assert "404" in stored.last_error or "No such" in stored.last_error
    assert stored.attempts == 1  # permanent: no retry
    (failed,) = captured.messages(logs.WEBHOOK_PROCESSING_FAILED)
    assert failed.levelname == "ERROR" and failed.will_retry is False
    with webhook_runtime.session_factory() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(MeterErrorReport)) == 0
