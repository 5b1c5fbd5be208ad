"""Fixtures for entitlement tests: the `saas` price in the emulator, subscriptions to it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from billing.entitlements import SAAS_FEATURE
from billing.models import BillingAccount
from billing.runtime import Runtime


@dataclass
class SaasCatalog:
    runtime: Runtime
    price_id: str

    def customer_for(self, organization_id: int) -> str:
        """A Stripe customer linked to the organization's billing account."""
        customer = self.runtime.stripe.create_customer(f"Org {organization_id}", organization_id)
        with self.runtime.session_factory.begin() as session:
            session.merge(
                BillingAccount(organization_id=organization_id, stripe_customer_id=customer.id)
            )
        return customer.id

    def subscribe(self, customer_id: str, price_id: str | None = None) -> str:
        # Test set-up only: the product never creates subscriptions itself (Checkout does).
        subscription = self.runtime.stripe.client.v1.subscriptions.create(
            {"customer": customer_id, "items": [{"price": price_id or self.price_id}]}
        )
        return subscription.id

    def product(self, name: str, unit_amount: int = 100) -> object:
        """A product with a monthly default price and no features (tests attach what they need)."""
        recurring = {
            "currency": "usd",
            "unit_amount": unit_amount,
            "recurring": {"interval": "month"},
        }
        return self.runtime.stripe.client.v1.products.create(
            {"name": name, "default_price_data": recurring}
        )

    def cancel(self, subscription_id: str) -> None:
        self.runtime.stripe.client.v1.subscriptions.cancel(subscription_id)


@pytest.fixture
def saas_catalog(billing_runtime: Runtime) -> SaasCatalog:
    price_id = billing_runtime.stripe.ensure_feature_price(
        SAAS_FEATURE, product_name="Workspace", unit_amount=4900
    )
    return SaasCatalog(billing_runtime, price_id)
