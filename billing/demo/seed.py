"""`seed_demo`: meters, customers, billing accounts and random past events, in Stripe test mode."""

from __future__ import annotations

import random
import sys
import uuid
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from billing.accounts import store_subscription
from billing.models import BillableEvent, BillingAccount, utcnow
from billing.runtime import Runtime

DEFAULT_EVENT_TYPES = {"api_call": "api_call", "storage_gb_hour": "storage_gb_hour"}
INSERT_CHUNK = 5000


def seed_demo(
    runtime: Runtime, *, orgs: int, events: int, hours: int, seed: int | None = None
) -> dict[str, Any]:
    gateway = runtime.stripe
    gateway.require_test_mode("seed_demo")
    meters = runtime.settings.stripe_meters or DEFAULT_EVENT_TYPES
    prices = [
        gateway.ensure_metered_price(gateway.ensure_meter(event_name))
        for event_name in sorted(set(meters.values()))
    ]
    rng = random.Random(seed)
    with runtime.session_factory.begin() as session:
        first = (session.scalar(sa.select(sa.func.max(BillingAccount.organization_id))) or 0) + 1
        organization_ids = list(range(first, first + orgs))
        customers = {
            organization_id: gateway.create_customer(f"Demo org {organization_id}", organization_id)
            for organization_id in organization_ids
        }
        session.add_all(
            BillingAccount(organization_id=org, stripe_customer_id=customer.id)
            for org, customer in customers.items()
        )
    # A metered subscription per organization, so `smoke_org` and invoices work on demo data.
    # It starts now, after the seeded usage: Stripe keeps that usage on the meter, but no
    # invoice of this subscription bills it.
    subscriptions = {}
    for organization_id, customer in customers.items():
        subscription = gateway.create_subscription(customer.id, prices, organization_id)
        store_subscription(runtime, organization_id, subscription)
        subscriptions[organization_id] = subscription.id
    now = utcnow()
    event_types = sorted(meters)
    run = uuid.uuid4().hex[:8]
    totals: dict[str, int] = {}
    show_progress = sys.stderr.isatty() and events >= INSERT_CHUNK
    for start in range(0, events, INSERT_CHUNK):
        rows = []
        for number in range(start, min(events, start + INSERT_CHUNK)):
            event_type = rng.choice(event_types)
            quantity = rng.randint(1, 20)
            totals[event_type] = totals.get(event_type, 0) + quantity
            rows.append(
                {
                    "organization_id": rng.choice(organization_ids),
                    "event_type": event_type,
                    "quantity": quantity,
                    "occurred_at": now - timedelta(seconds=rng.uniform(60, hours * 3600)),
                    "source": "zeitgeist",
                    "idempotency_key": f"demo-{run}-{number}",
                    "created_at": now,
                }
            )
        with runtime.session_factory.begin() as session:
            session.execute(sa.insert(BillableEvent), rows)
        if show_progress:
            print(f"\rseeded {start + len(rows)}/{events} events", end="", file=sys.stderr)
    if show_progress:
        print(file=sys.stderr)
    return {
        "organizations": organization_ids,
        "subscriptions": subscriptions,
        "prices": prices,
        "meters": meters,
        "events": events,
        "quantity_by_event_type": totals,
    }
