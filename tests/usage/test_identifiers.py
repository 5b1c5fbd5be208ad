"""Stripe identifiers: one per outbox row, never shared by two event types, at most 100 chars."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from billing.config import parse_meter_map
from billing.models import UsageSubmission, utcnow
from billing.usage.claiming import identifier_type_part, usage_identifier
from billing.usage.service import flush_pass
from tests.factories import add_accounts, add_events


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_event_types_that_sanitize_alike_get_their_own_identifiers(request, emulator, database):
    """`api_call` and `api.call` on one meter in one organization-hour once made one identifier:
    the second outbox row broke uq_usage_submissions_identifier on every flush."""
    runtime = request.getfixturevalue(
        "billing_runtime" if database == "postgresql" else "sqlite_runtime"
    )
    meters = parse_meter_map("STRIPE_BILLING_METERS", "api_call,api.call=api_call")
    runtime.settings = runtime.settings.replace(stripe_meters=meters)
    customers = add_accounts(runtime, [1])
    hour_ago = utcnow() - timedelta(hours=1)
    add_events(
        runtime,
        [
            {"organization_id": 1, "event_type": t, "quantity": q, "occurred_at": hour_ago}
            for t, q in (("api_call", 2), ("api.call", 5))
        ],
    )

    result = flush_pass(runtime)

    assert result.ok and result.events_claimed == 2 and result.submissions_sent == 2
    assert emulator.billed() == {customers[1]: {"api_call": 7}}
    with runtime.session_factory() as session:
        identifiers = session.scalars(sa.select(UsageSubmission.identifier)).all()
    assert len(set(identifiers)) == 2


def test_the_type_part_is_one_to_one_and_the_identifier_fits_stripe():
    types = [
        "api_call",
        "api.call",
        "api-call",
        "api call",
        "API_CALL",
        "api_call-1",
        "x" * 40,
        "x" * 41,
        "x" * 41 + "y",
        "x" * 100,
        "x" * 99 + "y",
        "évènement",
        "e_v_nement",
    ]
    parts = [identifier_type_part(t) for t in types]
    assert len(set(parts)) == len(types)
    assert identifier_type_part("api_call") == "api_call"  # plain names stay readable
    start = datetime(2026, 12, 2, 9, tzinfo=UTC)
    longest = usage_identifier(-(2**63), "x" * 100 + ".", start, "0123456789ab")
    assert len(longest) <= 100
