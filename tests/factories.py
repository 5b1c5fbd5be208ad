"""Rows, schema changes and Stripe objects every test shares: `add_events`/`add_accounts` through
the ORM for flush tests, `insert_events`/`add_account`/`subscribe` and friends for the contract,
smoke and account tests."""

from __future__ import annotations

import contextlib
import itertools
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

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


def seed_usage(
    runtime: Runtime, organization_ids: list[int], event_types: list[str], count: int, **kw: Any
) -> tuple[dict[int, str], list[dict]]:
    """Billing accounts for the organizations and `count` random events of theirs (`random_events`
    keywords): (customers, rows)."""
    customers = add_accounts(runtime, organization_ids)
    rows = random_events(organization_ids, event_types, count, **kw)
    add_events(runtime, rows)
    return customers, rows


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


def rate_limited(api: str) -> float:
    """How many meter event requests of `api` this process has seen answered 429."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("billing_meter_event_rate_limited_total", {"api": api}) or 0


def unclaimed_count(runtime: Runtime) -> int:
    with runtime.session_factory() as session:
        return session.scalar(
            sa.select(sa.func.count())
            .select_from(BillableEvent)
            .where(BillableEvent.usage_submission_id.is_(None))
        )


_keys = itertools.count(1)


def insert_events(engine: sa.Engine, *rows: dict[str, Any], **defaults: Any) -> list[int]:
    """Insert billable events (org 1, api_call, quantity 1, an hour ago, zeitgeist); their ids."""
    now = utcnow()
    base = {
        "organization_id": 1,
        "event_type": "api_call",
        "quantity": 1,
        "occurred_at": now - timedelta(hours=1),
        "source": "zeitgeist",
        "created_at": now,
    }
    values = [
        {**base, **defaults, "idempotency_key": f"evt-{next(_keys)}", **row} for row in rows or [{}]
    ]
    with engine.begin() as connection:
        return list(
            connection.scalars(sa.insert(BillableEvent).returning(BillableEvent.id), values)
        )


def add_account(
    engine: sa.Engine,
    organization_id: int,
    customer: str | None = None,
    subscription: str | None = None,
) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.insert(BillingAccount),
            {
                "organization_id": organization_id,
                "stripe_customer_id": customer,
                "stripe_subscription_id": subscription,
                "created_at": utcnow(),
                "updated_at": utcnow(),
            },
        )


def add_submission(
    engine: sa.Engine,
    organization_id: int,
    customer: str,
    window_start: datetime,
    value: int,
    *,
    event_name: str = "api_call",
    status: str = "sent",
) -> int:
    """An outbox row, as if a flush had written (and, by default, sent) it."""
    now = utcnow()
    row = {
        "organization_id": organization_id,
        "stripe_customer_id": customer,
        "event_type": event_name,
        "event_name": event_name,
        "value": value,
        "event_count": 1,
        "window_start": window_start,
        "window_end": window_start + timedelta(hours=1),
        "identifier": f"test-{next(_keys)}",
        "status": status,
        "attempts": 1,
        "created_at": now,
        "updated_at": now,
    }
    with engine.begin() as connection:
        return connection.scalar(sa.insert(UsageSubmission).returning(UsageSubmission.id), row)


@contextlib.contextmanager
def altered(
    engine: sa.Engine, change: str, restore: str, *, truncate: bool = True
) -> Iterator[None]:
    """Change the schema (e.g. to seed a defect it forbids); empty the table and restore after."""
    with engine.begin() as connection:
        connection.exec_driver_sql(change)
    try:
        yield
    finally:
        with engine.begin() as connection:
            if truncate:
                connection.exec_driver_sql("TRUNCATE billable_events")
            connection.exec_driver_sql(restore)


def execute(engine: sa.Engine, sql: str) -> None:
    with engine.begin() as connection:
        connection.exec_driver_sql(sql)


def account_row(runtime: Runtime, organization_id: int) -> BillingAccount | None:
    with runtime.session_factory() as session:
        return session.get(BillingAccount, organization_id)


def subscribe(runtime: Runtime, organization_id: int, *, interval: str = "month") -> Any:
    """A Stripe customer with a metered subscription (one price per meter) and its account."""
    gateway = runtime.stripe
    client = gateway.client
    customer = gateway.create_customer(f"Org {organization_id}", organization_id)
    items = [
        {
            "price": client.v1.prices.create(
                {
                    "currency": "usd",
                    "unit_amount": 1,
                    "product_data": {"name": name},
                    "recurring": {"interval": interval, "usage_type": "metered", "meter": meter.id},
                }
            ).id
        }
        for name, meter in sorted(gateway.meter_by_event_name().items())
    ]
    subscription = client.v1.subscriptions.create({"customer": customer.id, "items": items})
    add_account(runtime.engine, organization_id, customer.id, subscription.id)
    return subscription


def subscribe_hours_ago(runtime: Runtime, emulator: Any, organization_id: int, hours: int) -> Any:
    """`subscribe`, with the current period started `hours` ago (the emulator's clock set back)."""
    now = int(time.time())
    emulator.control("POST", "clock", {"set": now - hours * 3600})
    try:
        return subscribe(runtime, organization_id)
    finally:
        emulator.control("POST", "clock", {"set": int(time.time())})
