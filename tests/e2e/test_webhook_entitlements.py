"""Access follows Stripe through the real webhook flow, both ways, with manual grants kept.

The demo app runs on a real port; the emulator POSTs its signed webhooks to the real ingest
view and a real Celery worker processes them. A subscription bought through Checkout opens the
workspace; canceling it in Stripe locks the workspace again, unless an operator granted `saas`
by hand, which the Stripe refresh leaves alone.
"""

from __future__ import annotations

from sqlalchemy import select

from billing.entitlements import SAAS_FEATURE
from billing.entitlements.service import grant_manual, has_entitlement
from billing.models import Entitlement
from billing.stripe_gateway import SubscriptionCheckout
from tests.fixtures.webhooks import wait_until


def buy_saas(runtime, emulator, price_id: str, organization_id: int) -> str:
    """Checkout completed as if paid (the emulator's control); the subscription id."""
    checkout = runtime.stripe.create_subscription_checkout(
        SubscriptionCheckout(
            organization_id=organization_id,
            price_id=price_id,
            success_url="http://127.0.0.1/success",
            cancel_url="http://127.0.0.1/cancel",
        )
    )
    completed = emulator.control("POST", f"checkout_sessions/{checkout.id}/complete", {})
    return completed["subscription"]


def workspace_status(app, organization_id: int) -> int:
    client = app.test_client()
    with client.session_transaction() as session:
        session["organization_id"] = organization_id
    return client.get("/workspace").status_code


def test_canceling_in_stripe_locks_again_but_a_manual_grant_stays(
    serve_upgrade_app, saas_catalog, emulator
):
    server, runtime = serve_upgrade_app()
    subscriptions = {org: buy_saas(runtime, emulator, saas_catalog.price_id, org) for org in (4, 5)}
    wait_until(
        lambda: all(has_entitlement(runtime, org, SAAS_FEATURE) for org in (4, 5)), what="unlock"
    )
    assert workspace_status(server.app, 4) == workspace_status(server.app, 5) == 200

    grant_manual(runtime, 5, SAAS_FEATURE, note="kept through a cancellation")
    for subscription in subscriptions.values():
        runtime.stripe.client.v1.subscriptions.cancel(subscription)
    wait_until(lambda: not has_entitlement(runtime, 4, SAAS_FEATURE), what="the Stripe revocation")
    assert workspace_status(server.app, 4) == 302  # locked again
    # Organization 5's Stripe row went inactive in the same kind of refresh; the manual one stays.
    emulator.control("POST", "webhooks/flush", {"timeout": 10})
    wait_until(
        lambda: not _stripe_row_active(runtime, 5),
        what="organization 5's Stripe row to go inactive",
    )
    assert workspace_status(server.app, 5) == 200


def _stripe_row_active(runtime, organization_id: int) -> bool:
    with runtime.session_factory() as session:
        return bool(
            session.scalar(
                select(Entitlement.active).where(
                    Entitlement.organization_id == organization_id,
                    Entitlement.source == "stripe",
                )
            )
        )
