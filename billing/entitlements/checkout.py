"""Self-service upgrade: a Stripe Checkout Session that subscribes an organization to the `saas`
price. Starting one grants nothing: access follows the `saas` entitlement, which only the webhook
flow (or an operator) sets once Stripe says the subscription is live."""

from __future__ import annotations

from sqlalchemy import select

from billing import logs
from billing.config import ConfigError
from billing.entitlements import SAAS_FEATURE
from billing.models import BillingAccount
from billing.runtime import Runtime
from billing.stripe_gateway import PermanentStripeError, SubscriptionCheckout

log = logs.get_logger("billing.entitlements")


def start_upgrade_checkout(
    runtime: Runtime, organization_id: int, *, success_url: str, cancel_url: str
) -> str:
    """Create the Checkout Session for the organization; the URL to send the browser to."""
    price_id = runtime.settings.saas_price_id
    if not price_id:
        raise ConfigError("STRIPE_SAAS_PRICE_ID is not set: the SaaS gate is in booking mode")
    with runtime.session_factory() as session:
        # Reusing the customer keeps one Stripe customer per organization (and its usage billing).
        customer_id = session.scalar(
            select(BillingAccount.stripe_customer_id).where(
                BillingAccount.organization_id == organization_id
            )
        )
    checkout = runtime.stripe.create_subscription_checkout(
        SubscriptionCheckout(
            organization_id=organization_id,
            price_id=price_id,
            success_url=success_url,
            cancel_url=cancel_url,
            customer_id=customer_id,
        )
    )
    log.info(
        logs.SAAS_CHECKOUT_STARTED,
        extra={
            "organization_id": organization_id,
            "checkout_session_id": checkout.id,
            "stripe_customer_id": customer_id,
        },
    )
    return str(checkout.url)


def upgrade_price_problems(runtime: Runtime, price_id: str) -> list[str]:
    """Why `price_id` cannot sell the `saas` upgrade (empty: it can). Read-only, for preflight.

    The costly mistake is a price whose product does not grant `saas`: customers would pay and
    the workspace would never unlock.
    """
    try:
        price = runtime.stripe.retrieve_price(price_id)
    except PermanentStripeError as error:
        if error.status == 404:
            return [f"{price_id} does not exist in this Stripe account"]
        raise
    problems = []
    if not price.active:
        problems.append(f"{price_id} is archived")
    if price.recurring is None:
        problems.append(f"{price_id} is a one-time price; a subscription needs a recurring one")
    elif price.recurring.usage_type == "metered":
        problems.append(f"{price_id} is metered; the upgrade needs a licensed (flat) price")
    product_id = price.product if isinstance(price.product, str) else price.product.id
    if SAAS_FEATURE not in runtime.stripe.product_feature_lookup_keys(product_id):
        problems.append(
            f"its product {product_id} does not grant the `{SAAS_FEATURE}` feature: a paid "
            "checkout would never unlock the workspace"
        )
    return problems


def create_demo_price(runtime: Runtime, *, amount_cents: int, currency: str = "usd") -> str:
    """Test mode only: a monthly price whose product grants `saas`; its id, for
    STRIPE_SAAS_PRICE_ID (`flask billing entitlements demo_price`, scripts/demo_saas.sh)."""
    return runtime.stripe.ensure_feature_price(
        SAAS_FEATURE, product_name="SaaS workspace", unit_amount=amount_cents, currency=currency
    )
