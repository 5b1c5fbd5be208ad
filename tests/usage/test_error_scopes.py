"""No usage lost to a configuration mistake: a refused key, an unknown meter or a missing customer
leaves rows pending (never failed), the run says so, and the next flush after the fix bills them
exactly once. Real PostgreSQL, the emulator's own Stripe-shaped refusals."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa

from billing import create_app
from billing.models import BillingAccount, UsageSubmission, utcnow
from billing.usage.service import flush_pass
from tests.factories import (
    add_accounts,
    add_events,
    expected_totals,
    random_events,
    submission_statuses,
    unclaimed_count,
)

ORGS = [11, 12, 13]
TYPES = ["api_call", "storage_gb_hour"]
METER_EVENTS = "POST /v1/billing/meter_events"


@pytest.fixture
def seeded(billing_runtime):
    customers = add_accounts(billing_runtime, ORGS)
    rows = random_events(ORGS, TYPES, 120, hours=5)
    add_events(billing_runtime, rows)
    return customers, rows


def _calls(emulator) -> int:
    return emulator.stats()["requests"].get(METER_EVENTS, 0)


def _scopes(runtime) -> dict[int, str | None]:
    with runtime.session_factory() as session:
        return dict(
            session.execute(sa.select(UsageSubmission.id, UsageSubmission.last_error_scope)).all()
        )


REFUSED_KEYS = {
    "live-key": "sk_live_" + "refusedbytheemulator00",
    "typo": "sx_test_" + "billingtests0000",
}


@pytest.mark.parametrize("key", REFUSED_KEYS.values(), ids=REFUSED_KEYS.keys())
def test_refused_key_stops_the_run_fails_no_row_and_bills_after_the_fix(
    billing_runtime, emulator, seeded, key
):
    customers, rows = seeded
    good = billing_runtime.settings
    billing_runtime.settings = good.replace(stripe_secret_key=key)
    billing_runtime.__dict__.pop("stripe", None)  # the gateway is built from the settings

    refused = flush_pass(billing_runtime)

    assert refused.stop_error and "AuthenticationError" in refused.stop_error
    assert refused.submissions_failed == 0 and refused.submissions_sent == 0
    assert not refused.ok and refused.to_dict()["ok"] is False
    # Found before claiming: nothing parked in the outbox, not one meter event call.
    assert submission_statuses(billing_runtime) == {} and unclaimed_count(billing_runtime) == 120
    assert _calls(emulator) == 0 and emulator.billed() == {}

    billing_runtime.settings = good
    billing_runtime.__dict__.pop("stripe", None)
    fixed = flush_pass(billing_runtime)
    assert fixed.ok and fixed.stop_error is None
    assert emulator.billed() == expected_totals(rows, customers)
    assert unclaimed_count(billing_runtime) == 0
    again = flush_pass(billing_runtime)
    assert again.ok and again.submissions_sent == 0
    assert emulator.billed() == expected_totals(rows, customers)


def test_rows_already_pending_stay_pending_under_a_refused_key(billing_runtime, emulator, seeded):
    customers, rows = seeded
    emulator.faults({"path": "/v1/billing/meter_events", "status": 500})
    assert flush_pass(billing_runtime).submissions_pending > 0  # an earlier run left them
    emulator.faults({"clear": True})
    good = billing_runtime.settings
    billing_runtime.settings = good.replace(stripe_secret_key=REFUSED_KEYS["typo"])
    billing_runtime.__dict__.pop("stripe", None)
    calls_before = _calls(emulator)

    refused = flush_pass(billing_runtime)
    assert refused.stop_error and refused.submissions_failed == 0
    assert set(submission_statuses(billing_runtime)) == {"pending"}
    assert _calls(emulator) == calls_before  # not re-sent under the refused key

    billing_runtime.settings = good
    billing_runtime.__dict__.pop("stripe", None)
    assert flush_pass(billing_runtime).ok
    assert emulator.billed() == expected_totals(rows, customers)


def test_refused_key_is_one_line_and_exit_one_from_the_cli(billing_runtime, emulator, seeded):
    settings = billing_runtime.settings.replace(stripe_secret_key=REFUSED_KEYS["live-key"])
    result = create_app(settings).test_cli_runner().invoke(args=["billing", "flush_now"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Stripe refused the account" in lines[0]
    assert "Traceback" not in result.output and REFUSED_KEYS["live-key"] not in result.output
    assert json.loads(result.stdout)["submissions_failed"] == 0


def test_flush_hourly_does_not_retry_a_refused_key(billing_runtime, emulator, seeded):
    settings = billing_runtime.settings.replace(stripe_secret_key=REFUSED_KEYS["typo"])
    result = create_app(settings).test_cli_runner().invoke(args=["billing", "flush_hourly"])
    assert result.exit_code == 1 and "Stripe refused the account" in result.stderr
    assert _calls(emulator) <= settings.submit_concurrency


def test_unknown_meter_stops_that_meter_while_the_rest_is_billed(billing_runtime, emulator, seeded):
    customers, rows = seeded
    good = billing_runtime.settings
    billing_runtime.settings = good.replace(
        stripe_meters={"api_call": "typo", "storage_gb_hour": "storage_gb_hour"}
    )
    result = flush_pass(billing_runtime)

    assert not result.ok and result.submissions_failed == 0
    assert set(result.stopped_meters) == {"typo"}
    assert "No active Stripe meter" in result.stopped_meters["typo"]
    storage_rows = [r for r in rows if r["event_type"] == "storage_gb_hour"]
    assert emulator.billed() == expected_totals(storage_rows, customers)
    assert submission_statuses(billing_runtime)["failed"] == 0
    # Found before claiming: its usage stays unclaimed and no call is refused.
    assert unclaimed_count(billing_runtime) == len(rows) - len(storage_rows)
    assert emulator.stats()["meter_events"]["rejected"] == 0

    billing_runtime.settings = good  # the mapping is fixed
    fixed = flush_pass(billing_runtime)
    assert fixed.ok, fixed.to_dict()
    assert emulator.billed() == expected_totals(rows, customers)
    assert set(submission_statuses(billing_runtime)) == {"sent"}


def test_an_unknown_meter_is_named_on_stderr_and_exits_one(billing_runtime, emulator, seeded):
    settings = billing_runtime.settings.replace(
        stripe_meters={"api_call": "typo", "storage_gb_hour": "storage_gb_hour"}
    )
    result = create_app(settings).test_cli_runner().invoke(args=["billing", "flush_now"])
    assert result.exit_code == 1
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "'typo'" in line and "STRIPE_BILLING_METERS" in line
    payload = json.loads(result.stdout)
    assert payload["submissions_failed"] == 0 and payload["submissions_sent"] > 0


@pytest.mark.usefixtures("sync_meter_validation")  # the customer stop needs Stripe's 400 at once
def test_missing_customer_stops_that_customer_while_the_rest_is_billed(
    billing_runtime, emulator, seeded
):
    customers, rows = seeded
    with billing_runtime.session_factory.begin() as session:
        session.add(BillingAccount(organization_id=14, stripe_customer_id="cus_doesnotexist"))
    late = [
        {
            "organization_id": 14,
            "event_type": t,
            "quantity": 6,
            "occurred_at": utcnow() - timedelta(minutes=m),
        }
        for t in TYPES
        for m in (20, 90)
    ]
    add_events(billing_runtime, late)

    result = flush_pass(billing_runtime)
    assert not result.ok and result.submissions_failed == 0
    assert set(result.stopped_customers) == {"cus_doesnotexist"}
    assert emulator.billed() == expected_totals(rows, customers)
    with billing_runtime.session_factory() as session:
        stuck = session.scalars(
            sa.select(UsageSubmission.status).where(UsageSubmission.organization_id == 14)
        ).all()
    assert stuck and set(stuck) == {"pending"}

    # The operator points the organization at its real customer: the next flush bills it once.
    customers[14] = billing_runtime.stripe.create_customer("Org 14", 14).id
    with billing_runtime.session_factory.begin() as session:
        session.get(BillingAccount, 14).stripe_customer_id = customers[14]
    fixed = flush_pass(billing_runtime)
    assert fixed.ok, fixed.to_dict()
    assert emulator.billed() == expected_totals(rows + late, customers)
    assert flush_pass(billing_runtime).submissions_sent == 0


@pytest.mark.usefixtures("sync_meter_validation")
def test_deleted_customer_is_a_customer_stop_not_a_failed_row(billing_runtime, emulator, seeded):
    customers, rows = seeded
    billing_runtime.stripe.client.v1.customers.delete(customers[13])
    result = flush_pass(billing_runtime)
    assert set(result.stopped_customers) == {customers[13]} and result.submissions_failed == 0
    others = [r for r in rows if r["organization_id"] != 13]
    assert emulator.billed() == expected_totals(others, customers)
    assert "customer" in set(_scopes(billing_runtime).values())


def test_failed_rows_of_an_earlier_run_keep_every_flush_not_ok(billing_runtime, emulator, seeded):
    emulator.faults({"path": "/v1/billing/meter_events", "status": 400, "count": 1})
    first = flush_pass(billing_runtime)
    assert first.submissions_failed == 1

    # Nothing new to send, nothing this run touched: still not ok while the failed row waits.
    later = flush_pass(billing_runtime)
    assert later.submissions_failed == 0 and later.events_claimed == 0
    assert later.awaiting_operator == {"failed": 1, "held": 0, "rejected": 0} and not later.ok
    result = (
        create_app(billing_runtime.settings).test_cli_runner().invoke(args=["billing", "flush_now"])
    )
    assert result.exit_code == 1 and "1 failed" in result.stderr
