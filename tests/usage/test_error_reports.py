"""The targeted reconciliation of meter error reports, end to end: the emulator validates
asynchronously and delivers its thin error report over HTTP to the app, a real worker fetches and
records it (its samples marked rejected), then the worker's reconciliation task finds the rows
the samples did not name."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from billing import accounts, create_app
from billing.models import MeterErrorReport, UsageSubmission, utcnow
from billing.usage import outbox
from billing.usage.error_reports import reconcile_error_reports
from billing.usage.reconcile import floor_hour
from billing.usage.service import flush_pass
from billing.usage.tasks import reconcile_meter_error_reports
from tests.factories import add_accounts, add_events
from tests.fixtures.webhooks import OLD_SECRET, SECRET, wait_until

SETTLE = 2  # seconds: the emulator's summaries do not lag here
# The emulator's error report delay: a flush of these few rows ends well within it, so its errors
# are one report (the tests still allow several, as the emulator and Stripe may cut windows).
DELAY = 3
SAMPLES = 5
CUSTOMER_CODE = "meter_event_customer_not_found"


@pytest.fixture
def webhook_settings(billing_settings):
    return billing_settings.replace(
        stripe_webhook_secret=f"{SECRET},{OLD_SECRET}", reconcile_settle_seconds=SETTLE
    )


@pytest.fixture
def async_reports(emulator):
    emulator.settings(
        meter_validation="async",
        error_report_delay_seconds=DELAY,
        error_report_samples=SAMPLES,
    )
    return emulator


def hourly_usage(runtime, org: int, hours: int, quantity=lambda hour: hour + 1) -> None:
    now = utcnow()
    add_events(
        runtime,
        [
            {
                "organization_id": org,
                "event_type": "api_call",
                "quantity": quantity(hour),
                "occurred_at": floor_hour(now) - timedelta(hours=hour, minutes=-5),
            }
            for hour in range(1, hours + 1)
        ],
    )


def rows_of(runtime, org: int) -> list[UsageSubmission]:
    with runtime.session_factory() as session:
        return list(
            session.scalars(
                sa.select(UsageSubmission)
                .where(UsageSubmission.organization_id == org)
                .order_by(UsageSubmission.id)
            )
        )


def recorded_reports(runtime, errors: int) -> list[MeterErrorReport]:
    """The reports the worker recorded, once they count `errors` errors in all (a flush slower
    than the report delay spreads its errors over several reports, one window each)."""

    def stored():
        with runtime.session_factory() as session:
            reports = list(session.scalars(sa.select(MeterErrorReport)))
        return reports if sum(r.error_count for r in reports) == errors else None

    return wait_until(stored, 30, f"the worker to record meter error reports of {errors} errors")


def wait_past_settle(reports: list[MeterErrorReport]) -> None:
    settled = max(r.validation_end for r in reports) + timedelta(seconds=SETTLE)
    time.sleep(max(0.0, (settled - utcnow()).total_seconds()))


def run_task_and_wait(runtime, condition, what: str):
    reconcile_meter_error_reports.apply_async(queue=runtime.settings.billing_queue)
    return wait_until(condition, 30, what)


def test_thirty_rejected_groups_with_five_samples_all_end_rejected_then_bill_once(
    delivering, webhook_runtime, async_reports
):
    runtime = webhook_runtime
    customers = add_accounts(runtime, [1])
    hourly_usage(runtime, 1, 30)
    runtime.stripe.client.v1.customers.delete(customers[1])
    assert flush_pass(runtime).submissions_sent == 30  # all answered 200: async validation

    reports = recorded_reports(runtime, 30)
    named = sum(r.matched for r in reports)
    assert all(r.matched == min(SAMPLES, r.error_count) for r in reports)
    assert any(r.reconciled_at is None for r in reports)  # errors no sample named
    wait_until(
        lambda: sum(r.status == "rejected" for r in rows_of(runtime, 1)) == named,
        30,
        "the samples' rows marked rejected",
    )
    # Once the summaries of the windows settled, the task finds the others.
    wait_past_settle(reports)
    run_task_and_wait(
        runtime,
        lambda: all(r.reconciled_at for r in recorded_reports(runtime, 30)),
        "the worker to reconcile every report",
    )
    assert all(r.status == "rejected" for r in rows_of(runtime, 1))
    rows = rows_of(runtime, 1)
    by_reconcile = [r for r in rows if r.last_error.endswith("found by reconciliation")]
    assert len(by_reconcile) == 30 - named >= 30 - len(reports) * SAMPLES > 0
    # Stripe's code (the samples all had it), so the retry follows the relinked customer.
    assert {r.last_error.split(":")[0] for r in rows} == {CUSTOMER_CODE}
    assert {r.last_error_scope for r in rows} == {"customer"}
    with runtime.session_factory() as session:
        done = list(session.scalars(sa.select(MeterErrorReport)))
    assert all(r.reconciled_at is not None for r in done)
    found = [r.result for r in done if r.result]  # reports whose samples named every error: none
    assert {r["status"] for r in found} == {"reconciled"}
    assert sum(len(r["rejected"]) for r in found) == 30 - named

    # Fixed: relinked, re-queued with new identifiers, billed once.
    customers[1] = runtime.stripe.create_customer("Org 1 again", 1).id
    accounts.link_account(runtime, 1, customers[1], None)
    outbox.retry_submissions(runtime, [r.id for r in rows], actor="test")
    assert flush_pass(runtime).submissions_sent == 30
    time.sleep(DELAY + 0.5)  # a report of anything refused again would be on its way
    assert delivering.settle()
    billed = rows_of(runtime, 1)
    assert {r.status for r in billed} == {"sent"}
    assert async_reports.billed()[customers[1]] == {"api_call": sum(r.value for r in billed)}
    assert sum(r.value for r in billed) == sum(hour + 1 for hour in range(1, 31))


def test_a_report_is_not_judged_before_its_summaries_settle(
    delivering, webhook_runtime, async_reports, make_runtime
):
    customers = add_accounts(webhook_runtime, [2])
    hourly_usage(webhook_runtime, 2, 8)
    webhook_runtime.stripe.client.v1.customers.delete(customers[2])
    assert flush_pass(webhook_runtime).submissions_sent == 8
    reports = recorded_reports(webhook_runtime, 8)
    named = sum(r.matched for r in reports)
    patient = make_runtime(webhook_runtime.settings.replace(reconcile_settle_seconds=3600))
    assert reconcile_error_reports(patient) == []
    wait_until(
        lambda: sum(r.status == "rejected" for r in rows_of(webhook_runtime, 2)) == named,
        30,
        "the samples' rows marked rejected",
    )
    later = utcnow() + timedelta(seconds=3601)
    results = reconcile_error_reports(patient, now=later)
    assert {r.event_id for r in results} == {
        r.stripe_event_id for r in reports if r.reconciled_at is None
    }
    assert sum(len(r.rejected) for r in results) == 8 - named
    assert {r.status for r in rows_of(webhook_runtime, 2)} == {"rejected"}


def test_a_report_never_marks_more_rows_than_it_has_unnamed_errors(
    delivering, webhook_runtime, async_reports
):
    """Another customer's row went missing in the same window for another reason (cancelled):
    seven rows look missing, the report names only three more errors: nothing is marked."""
    runtime = webhook_runtime
    customers = add_accounts(runtime, [3, 4])
    hourly_usage(runtime, 3, 8)
    hourly_usage(runtime, 4, 4)
    runtime.stripe.client.v1.customers.delete(customers[3])
    assert flush_pass(runtime).submissions_sent == 12
    other = rows_of(runtime, 4)[0]
    runtime.stripe.client.v1.billing.meter_event_adjustments.create(
        {"event_name": "api_call", "type": "cancel", "cancel": {"identifier": other.identifier}}
    )
    (report,) = recorded_reports(runtime, 8)  # one window (see DELAY)
    assert report.matched == SAMPLES
    wait_past_settle([report])
    cli = create_app(runtime.settings).test_cli_runner()
    result = cli.invoke(args=["billing", "reconcile", "--error-reports", "--json"])
    assert result.exit_code == 1, result.output  # not exact: a person looks
    (reconciled,) = json.loads(result.stdout)["reports"]
    assert reconciled["status"] == "ambiguous" and reconciled["rejected"] == []
    assert "4 row(s) look missing but the report leaves only 3" in reconciled["detail"]
    assert sum(r.status == "rejected" for r in rows_of(runtime, 3)) == SAMPLES
    assert {r.status for r in rows_of(runtime, 4)} == {"sent"}
