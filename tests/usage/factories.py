"""Rows and Stripe objects for flush tests."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from datetime import datetime, timedelta

import sqlalchemy as sa

from billing.models import BillableEvent, BillingAccount, UsageSubmission, utcnow
from billing.runtime import Runtime


def add_accounts(runtime: Runtime, organization_ids: list[int]) -> dict[int, str]:
    """Billing accounts with real (emulated) Stripe customers: {organization_id: customer id}."""
    customers = {
        org: runtime.stripe.create_customer(f"Org {org}", org).id for org in organization_ids
    }
    with runtime.session_factory.begin() as session:
        for org, customer in customers.items():
            session.add(BillingAccount(organization_id=org, stripe_customer_id=customer))
    return customers


def add_events(runtime: Runtime, rows: list[dict]) -> None:
    with runtime.session_factory.begin() as session:
        session.execute(
            sa.insert(BillableEvent),
            [
                {
                    "source": "zeitgeist",
                    "idempotency_key": f"evt-{uuid.uuid4().hex}",
                    "created_at": utcnow(),
                    **row,
                }
                for row in rows
            ],
        )


def random_events(
    organization_ids: list[int],
    event_types: list[str],
    count: int,
    *,
    hours: int = 6,
    seed: int = 7,
    now: datetime | None = None,
) -> list[dict]:
    rng = random.Random(seed)
    now = now or utcnow()
    return [
        {
            "organization_id": rng.choice(organization_ids),
            "event_type": rng.choice(event_types),
            "quantity": rng.randint(1, 50),
            "occurred_at": now - timedelta(seconds=rng.uniform(1, hours * 3600)),
        }
        for _ in range(count)
    ]


def expected_totals(rows: list[dict], customers: dict[int, str]) -> dict[str, dict[str, int]]:
    """{customer id: {event name: sum of quantities}} as the emulator reports billed totals."""
    totals: dict[str, Counter] = {}
    for row in rows:
        customer = customers[row["organization_id"]]
        totals.setdefault(customer, Counter())[row["event_type"]] += row["quantity"]
    return {customer: dict(counter) for customer, counter in totals.items()}


def submission_statuses(runtime: Runtime) -> Counter:
    with runtime.session_factory() as session:
        return Counter(session.scalars(sa.select(UsageSubmission.status)))


def unclaimed_count(runtime: Runtime) -> int:
    with runtime.session_factory() as session:
        return session.scalar(
            sa.select(sa.func.count())
            .select_from(BillableEvent)
            .where(BillableEvent.usage_submission_id.is_(None))
        )
