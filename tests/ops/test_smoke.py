"""smoke_org end to end: PostgreSQL, the flush, and the Stripe emulator's meter event summaries."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from billing.checks.report import Status
from billing.models import BillableEvent, utcnow
from billing.ops.smoke import UnknownOrganizationError, smoke_org
from tests.factories import (
    account_row,
    add_account,
    add_submission,
    insert_events,
    subscribe,
    subscribe_hours_ago,
)

ORG = 7
STEPS = [
    "test_mode",
    "billing_enabled",
    "billing_account",
    "stripe_customer",
    "stripe_subscription",
    "refresh_period",
    "contract",
    "flush",
    "meter_summaries",
]
QUANTITIES = {"api_call": [5, 7, 11], "storage_gb_hour": [3, 4]}


def run(runtime, organization_id: int = ORG, **options):
    options = {
        "require_enabled": True,
        "validate_contract": True,
        "refresh_period": True,
        "settle_seconds": 0,
        **options,
    }
    return smoke_org(runtime, organization_id, **options)


def statuses(report) -> dict[str, Status]:
    return {step.step: step.status for step in report.steps}


def step(report, name: str):
    return next(s for s in report.steps if s.step == name)


def assert_outcome(report, failed: str, skipped: list[str]) -> None:
    """Only `failed` failed, and exactly the `skipped` steps were not run because of it."""
    assert [s.step for s in report.steps] == STEPS
    assert not report.ok
    assert {s.step for s in report.steps if s.status is Status.FAIL} == {failed}
    not_run = [s.step for s in report.steps if s.detail == f"not run: {failed} failed"]
    assert not_run == skipped
    assert all(step(report, name).status is Status.SKIP for name in skipped)


AFTER_ACCOUNT = [
    "stripe_customer",
    "stripe_subscription",
    "refresh_period",
    "contract",
    "flush",
    "meter_summaries",
]
AFTER_SUBSCRIPTION = ["refresh_period", "flush", "meter_summaries"]


@pytest.fixture
def customer(billing_runtime, emulator):
    """ORG subscribed 6 hours ago, with usage in each of the last three hours."""
    subscription = subscribe_hours_ago(billing_runtime, emulator, ORG, hours=6)
    now = utcnow()
    insert_events(
        billing_runtime.engine,
        *(
            {
                "organization_id": ORG,
                "event_type": event_type,
                "quantity": quantity,
                "occurred_at": now - timedelta(hours=hour + 1, minutes=5),
            }
            for event_type, quantities in QUANTITIES.items()
            for hour, quantity in enumerate(quantities)
        ),
    )
    return subscription.customer


def unclaimed(runtime) -> int:
    with runtime.engine.connect() as connection:
        return connection.scalar(
            sa.select(sa.func.count()).where(BillableEvent.usage_submission_id.is_(None))
        )


class TestPassing:
    def test_billed_usage_is_confirmed_by_event_summaries(
        self, billing_runtime, emulator, customer
    ):
        report = run(billing_runtime)
        assert report.ok, report.table()
        assert set(statuses(report).values()) == {Status.PASS}
        expected = {name: sum(values) for name, values in QUANTITIES.items()}
        meters = step(report, "meter_summaries").values["meters"]
        for name, total in expected.items():
            assert meters[name]["sent_this_run"] == total
            assert meters[name]["outbox_sent"] == total
            assert meters[name]["stripe_total"] == total
        assert emulator.billed()[customer] == expected
        assert step(report, "flush").values["events_claimed"] == 5

    def test_refresh_period_stores_the_subscription_period(self, billing_runtime, customer):
        assert account_row(billing_runtime, ORG).current_period_start is None
        report = run(billing_runtime)
        account = account_row(billing_runtime, ORG)
        values = step(report, "refresh_period").values
        assert account.current_period_start.isoformat() == values["current_period_start"]
        assert account.current_period_end.isoformat() == values["current_period_end"]
        assert account.current_period_start < utcnow() - timedelta(hours=5)

    def test_a_second_run_still_matches_what_earlier_runs_sent(self, billing_runtime, customer):
        run(billing_runtime)
        again = run(billing_runtime, refresh_period=False, validate_contract=False)
        assert again.ok, again.table()
        meters = step(again, "meter_summaries").values["meters"]
        assert meters["api_call"]["sent_this_run"] == 0
        assert meters["api_call"]["stripe_total"] == sum(QUANTITIES["api_call"])
        assert statuses(again)["refresh_period"] is Status.SKIP
        assert statuses(again)["contract"] is Status.SKIP

    def test_usage_older_than_a_fresh_subscription_is_verified_not_skipped(
        self, billing_runtime, emulator
    ):
        """The period starts after this run's usage: comparing the period alone is 0 vs 0."""
        subscription = subscribe(billing_runtime, ORG)
        insert_events(
            billing_runtime.engine,
            *(
                {
                    "organization_id": ORG,
                    "event_type": "api_call",
                    "quantity": quantity,
                    "occurred_at": utcnow() - timedelta(hours=hour + 1),
                }
                for hour, quantity in enumerate(QUANTITIES["api_call"])
            ),
        )
        report = run(billing_runtime)
        assert report.ok, report.table()
        values = step(report, "meter_summaries").values
        assert values["compared_from"] < values["period_start"]
        api_call = values["meters"]["api_call"]
        total = sum(QUANTITIES["api_call"])
        assert api_call["sent_this_run"] == api_call["outbox_sent"] == total
        assert api_call["stripe_total"] == total
        assert emulator.billed()[subscription.customer] == {"api_call": total}


class TestRefusals:
    def test_a_live_key_is_refused_before_any_stripe_call(
        self, make_runtime, billing_settings, emulator, customer
    ):
        key = "sk_live_" + "realmoney4321"
        live = make_runtime(billing_settings.replace(stripe_secret_key=key))
        before = emulator.stats()["requests"]
        report = run(live)
        assert_outcome(report, "test_mode", STEPS[1:])
        assert "test mode only" in step(report, "test_mode").detail
        assert "sk_live_…4321" in step(report, "test_mode").detail
        assert "realmoney" not in step(report, "test_mode").detail
        after = emulator.stats()["requests"]
        api_calls = {k: v for k, v in after.items() if " /v1/" in k}
        assert api_calls == {k: v for k, v in before.items() if " /v1/" in k}
        assert unclaimed(live) == 5

    def test_unknown_organization(self, billing_runtime):
        with pytest.raises(UnknownOrganizationError, match="organization 404 is unknown"):
            run(billing_runtime, 404)

    def test_billing_disabled_when_required(self, make_runtime, billing_settings, customer):
        report = run(make_runtime(billing_settings.replace(billing_enabled=False)))
        assert_outcome(report, "billing_enabled", ["flush", "meter_summaries"])

    def test_billing_disabled_when_not_required(self, make_runtime, billing_settings, customer):
        rt = make_runtime(billing_settings.replace(billing_enabled=False))
        report = run(rt, require_enabled=False)
        assert report.ok
        assert statuses(report)["billing_enabled"] is Status.SKIP
        assert step(report, "flush").detail == "billing disabled: nothing flushed"
        assert statuses(report)["meter_summaries"] is Status.SKIP
        assert unclaimed(rt) == 5


class TestFailures:
    def test_events_without_a_billing_account(self, billing_runtime):
        insert_events(billing_runtime.engine, {"organization_id": ORG})
        report = run(billing_runtime)
        assert_outcome(report, "billing_account", AFTER_ACCOUNT)
        detail = step(report, "billing_account").detail
        assert "has 1 billable event(s) but no billing account" in detail

    def test_account_without_a_subscription(self, billing_runtime):
        customer = billing_runtime.stripe.create_customer("No plan", ORG)
        add_account(billing_runtime.engine, ORG, customer.id)
        assert_outcome(run(billing_runtime), "stripe_subscription", AFTER_SUBSCRIPTION)

    def test_canceled_subscription(self, billing_runtime, customer):
        subscription_id = account_row(billing_runtime, ORG).stripe_subscription_id
        billing_runtime.stripe.client.v1.subscriptions.cancel(subscription_id)
        report = run(billing_runtime)
        assert_outcome(report, "stripe_subscription", AFTER_SUBSCRIPTION)
        assert step(report, "stripe_subscription").values["status"] == "canceled"

    def test_customer_deleted_in_stripe(self, billing_runtime, customer):
        billing_runtime.stripe.client.v1.customers.delete(customer)
        assert_outcome(
            run(billing_runtime), "stripe_customer", ["stripe_subscription", *AFTER_SUBSCRIPTION]
        )

    def test_contract_failure_for_this_org_stops_before_the_flush(
        self, billing_runtime, emulator, customer
    ):
        bad = insert_events(billing_runtime.engine, {"organization_id": ORG, "quantity": 0})
        insert_events(billing_runtime.engine, {"organization_id": ORG + 1, "event_type": "nope"})
        report = run(billing_runtime)
        assert_outcome(report, "contract", ["flush", "meter_summaries"])
        [failure] = step(report, "contract").values["failures"]
        assert failure["check"] == "quantity_positive_integer"  # the other org is out of scope
        assert failure["sample_ids"] == bad
        assert unclaimed(billing_runtime) == 7 and emulator.billed() == {}

    def test_unbillable_events_fail_the_flush(self, billing_runtime, customer):
        insert_events(billing_runtime.engine, {"organization_id": ORG, "event_type": "nope"})
        report = run(billing_runtime, validate_contract=False)
        assert_outcome(report, "flush", ["meter_summaries"])
        assert "unbillable {'no_meter': 1}" in step(report, "flush").detail

    def test_stripe_refusing_meter_events_fails_the_flush(
        self, billing_runtime, emulator, customer
    ):
        emulator.faults({"path": "/v1/billing/meter_events", "method": "POST", "status": 400})
        report = run(billing_runtime)
        assert_outcome(report, "flush", ["meter_summaries"])
        assert step(report, "flush").values["submissions_failed"] > 0

    def test_nothing_sent_and_nothing_to_compare_is_not_a_pass(self, billing_runtime):
        subscribe(billing_runtime, ORG)
        report = run(billing_runtime)
        assert_outcome(report, "meter_summaries", [])
        assert "nothing verified" in step(report, "meter_summaries").detail

    def test_outbox_claims_more_than_stripe_has(self, billing_runtime, customer, make_runtime):
        """Short of what was sent, with the settle lag over: a mismatch (no lag here: 0)."""
        runtime = make_runtime(billing_runtime.settings.replace(reconcile_settle_seconds=0))
        account = account_row(runtime, ORG)
        hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=4)
        add_submission(runtime.engine, ORG, account.stripe_customer_id, hour, 100)
        report = run(runtime)
        assert_outcome(report, "meter_summaries", [])
        api_call = step(report, "meter_summaries").values["meters"]["api_call"]
        assert api_call["outbox_sent"] == sum(QUANTITIES["api_call"]) + 100
        assert api_call["stripe_total"] == sum(QUANTITIES["api_call"])
        assert step(report, "meter_summaries").detail.startswith("mismatch: ")

    def test_short_within_the_settle_lag_is_not_settled_not_a_mismatch(
        self, billing_runtime, customer
    ):
        """The same shortfall with rows sent just now, inside the default settle lag (1 h)."""
        account = account_row(billing_runtime, ORG)
        hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=4)
        add_submission(billing_runtime.engine, ORG, account.stripe_customer_id, hour, 100)
        report = run(billing_runtime, settle_seconds=0)
        assert_outcome(report, "meter_summaries", [])
        detail = step(report, "meter_summaries").detail
        assert detail.startswith("not settled after 0 s: api_call: Stripe 23 vs outbox 123")
        assert "mismatch" not in detail

    def test_with_summaries_lagging_it_waits_and_passes_once_they_caught_up(
        self, billing_runtime, emulator, customer
    ):
        emulator.settings(summary_lag_seconds=30)
        heard: list[str] = []

        def progress(message: str) -> None:
            if not heard:
                emulator.advance(30)  # Stripe catches up while the check waits
            heard.append(message)

        report = run(billing_runtime, settle_seconds=60, progress=progress)
        assert report.ok, report.table()
        summaries = step(report, "meter_summaries")
        assert heard and "of 23 after 0 s" in heard[0]
        assert summaries.values["waited_seconds"] >= 1
        assert summaries.values["meters"]["api_call"]["stripe_total"] == 23

    def test_the_wait_is_bounded_and_reports_its_progress(self, billing_runtime, customer):
        account = account_row(billing_runtime, ORG)
        hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=4)
        add_submission(billing_runtime.engine, ORG, account.stripe_customer_id, hour, 100)
        heard: list[str] = []
        started = time.monotonic()
        report = run(billing_runtime, settle_seconds=2, progress=heard.append)
        assert 2 <= time.monotonic() - started < 10
        summaries = step(report, "meter_summaries")
        assert summaries.detail.startswith("not settled after 2 s: ")
        assert summaries.values["waited_seconds"] >= 2
        assert heard and heard[0].startswith(
            "waiting for Stripe's meter event summaries to settle: api_call 23 of 123 after 0 s"
        )

    def test_the_cli_bounds_the_wait_and_prints_its_progress_on_stderr(
        self, billing_runtime, customer
    ):
        from billing import create_app

        account = account_row(billing_runtime, ORG)
        hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=4)
        add_submission(billing_runtime.engine, ORG, account.stripe_customer_id, hour, 100)
        runner = create_app(billing_runtime.settings).test_cli_runner()
        args = ["billing", "smoke_org", "--org-id", str(ORG), "--json", "--settle-seconds", "1"]
        result = runner.invoke(args=args)
        assert result.exit_code == 1
        assert "waiting for Stripe's meter event summaries to settle: api_call" in result.stderr
        steps = {s["step"]: s for s in json.loads(result.stdout)["steps"]}
        assert steps["meter_summaries"]["detail"].startswith("not settled after 1 s: ")

    def test_stripe_holding_more_than_was_sent_is_a_mismatch_at_once(
        self, billing_runtime, customer
    ):
        """No lag explains a surplus: a mismatch inside the settle lag too."""
        from billing.stripe_gateway import MeterEvent

        billing_runtime.stripe.send_meter_event(
            MeterEvent("api_call", customer, 9, utcnow() - timedelta(minutes=30), "x-1", "k-x-1")
        )
        report = run(billing_runtime)
        assert step(report, "meter_summaries").detail.startswith("mismatch: api_call: Stripe 32")

    def test_stripe_holds_usage_our_outbox_never_sent(self, billing_runtime, customer):
        from billing.stripe_gateway import MeterEvent

        billing_runtime.stripe.send_meter_event(
            MeterEvent(
                "storage_gb_hour",
                customer,
                9,
                utcnow() - timedelta(minutes=30),
                "elsewhere-1",
                "k1",
            )
        )
        report = run(billing_runtime)
        assert_outcome(report, "meter_summaries", [])
        storage = step(report, "meter_summaries").values["meters"]["storage_gb_hour"]
        assert storage["stripe_total"] == storage["outbox_sent"] + 9


def test_report_forms(billing_runtime, customer):
    report = run(billing_runtime)
    as_dict = report.to_dict()
    assert as_dict["organization_id"] == ORG and as_dict["ok"] is True
    assert [s["step"] for s in as_dict["steps"]] == STEPS
    lines = report.table().splitlines()
    assert lines[0].split() == ["step", "status", "detail"]
    assert [line.split()[0] for line in lines[1:]] == STEPS
