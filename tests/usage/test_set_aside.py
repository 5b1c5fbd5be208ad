"""A row or group that cannot be billed is set aside with its reason, counted and visible, and never
stops the rest: one hostile upstream row once failed every flush for every organization."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa

from billing import create_app
from billing.models import BillableEvent, UsageSubmission, utcnow
from billing.usage.claiming import Claimer
from billing.usage.service import flush_pass
from tests.factories import add_accounts, add_events, expected_totals

BIGINT_MAX = 9223372036854775807


def _normal_rows(orgs=(1, 2)) -> list[dict]:
    hour_ago = utcnow() - timedelta(hours=1)
    return [
        {"organization_id": org, "event_type": "api_call", "quantity": q, "occurred_at": hour_ago}
        for org in orgs
        for q in (3, 4 * org)
    ]


def _pending_quantities(runtime, organization_id: int) -> list:
    with runtime.session_factory() as session:
        return sorted(
            session.scalars(
                sa.select(BillableEvent.quantity).where(
                    BillableEvent.organization_id == organization_id,
                    BillableEvent.usage_submission_id.is_(None),
                )
            )
        )


def _flush_hourly(settings):
    result = create_app(settings).test_cli_runner().invoke(args=["billing", "flush_hourly"])
    assert "Traceback" not in result.output and "out of range" not in result.output
    payload = json.loads(result.stdout)
    assert result.exit_code == (0 if payload["ok"] else 1), result.output
    return payload


@pytest.mark.parametrize(
    "hostile",
    [[5 * 10**18, 5 * 10**18], [BIGINT_MAX]],
    ids=["two-5e18-in-one-group", "bigint-max"],
)
def test_a_huge_quantity_is_set_aside_and_every_other_organization_is_billed(
    billing_runtime, emulator, hostile
):
    """Two rows of 5e18 in one organization-type-hour overflowed bigint in the aggregate and
    failed every flush; one row of 2**63-1 was sent to Stripe as it was."""
    customers = add_accounts(billing_runtime, [1, 2, 3])
    normal = _normal_rows()
    hour_ago = utcnow() - timedelta(hours=1)
    add_events(
        billing_runtime,
        normal
        + [
            {"organization_id": 3, "event_type": "api_call", "quantity": q, "occurred_at": hour_ago}
            for q in hostile
        ],
    )

    payload = _flush_hourly(billing_runtime.settings)

    assert payload["ok"] and payload["events_claimed"] == len(normal)
    assert payload["unbillable"] == {"quantity_over_ceiling": len(hostile)}
    assert emulator.billed() == expected_totals(normal, customers)
    assert _pending_quantities(billing_runtime, 3) == sorted(hostile)


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_a_group_over_the_ceiling_is_set_aside_whole_even_across_batches(
    request, emulator, database, monkeypatch
):
    """Rows each under the event ceiling whose (organization, event type, hour) sums above the
    group ceiling: the whole group waits, whichever batch each of its rows falls in."""
    runtime = request.getfixturevalue(
        "billing_runtime" if database == "postgresql" else "sqlite_runtime"
    )
    runtime.settings = runtime.settings.replace(
        max_event_quantity=10, max_group_quantity=25, flush_batch_size=2
    )
    monkeypatch.setattr(Claimer, "GROWTH_LIMIT", 1)  # every batch 2 rows: the group is cut
    customers = add_accounts(runtime, [1, 2, 3])
    hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    over = [
        {
            "organization_id": 3,
            "event_type": "api_call",
            "quantity": 10,
            "occurred_at": hour + timedelta(minutes=m),
        }
        for m in (1, 2, 3)  # 30 > 25
    ]
    under = [
        {
            "organization_id": 3,
            "event_type": "api_call",
            "quantity": q,
            "occurred_at": hour + timedelta(hours=1, minutes=m),
        }
        for q, m in ((10, 1), (10, 2), (5, 3))  # 25: at the ceiling, billed
    ]
    normal = _normal_rows()
    add_events(runtime, normal + over + under)

    result = flush_pass(runtime)

    assert result.ok and result.events_claimed == len(normal) + len(under)
    assert result.unbillable == {"group_over_ceiling": 3}
    assert emulator.billed() == expected_totals(normal + under, customers)
    assert _pending_quantities(runtime, 3) == [10, 10, 10]
    with runtime.session_factory() as session:
        values = session.scalars(sa.select(UsageSubmission.value)).all()
    assert max(values) <= 25


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_fractional_quantities_are_kept_as_written_and_set_aside(request, emulator, database):
    """On billing's own schema PostgreSQL rounded a plain-SQL 1.5 to 2 (billed 2) and 0.4 to 0
    (lost) while the column was bigint."""
    runtime = request.getfixturevalue(
        "billing_runtime" if database == "postgresql" else "sqlite_runtime"
    )
    customers = add_accounts(runtime, [1, 2])
    normal = _normal_rows()
    add_events(runtime, normal)
    stamp = (
        "now() - interval '1 hour'" if database == "postgresql" else "datetime('now', '-1 hour')"
    )
    with runtime.engine.begin() as connection:
        for key, quantity in (("half", "1.5"), ("small", "0.4")):
            connection.exec_driver_sql(
                "INSERT INTO billable_events "
                "(organization_id, event_type, quantity, occurred_at, source, idempotency_key) "
                f"VALUES (1, 'api_call', {quantity}, {stamp}, 'zeitgeist', '{key}')"
            )
        stored = dict(
            connection.exec_driver_sql(
                "SELECT idempotency_key, CAST(quantity AS TEXT) FROM billable_events "
                "WHERE idempotency_key IN ('half', 'small')"
            ).all()
        )
    assert stored == {"half": "1.5", "small": "0.4"}

    result = flush_pass(runtime)

    assert result.ok and result.events_claimed == len(normal)
    assert result.unbillable == {"invalid_quantity": 2}
    assert emulator.billed() == expected_totals(normal, customers)
    assert [float(q) for q in _pending_quantities(runtime, 1)] == [0.4, 1.5]
