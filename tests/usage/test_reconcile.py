"""`flask billing reconcile`: outbox vs Stripe's hourly meter event summaries, drift with the rows
behind it, and held rows settled only on a clear answer from Stripe."""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from billing import create_app
from billing.models import UsageSubmission, UsageSubmissionAction, utcnow
from billing.stripe_gateway import MeterEvent
from billing.usage.reconcile import (
    MAX_ATTRIBUTED_ROWS,
    floor_hour,
    missing_rows,
    reconcile,
    reconcile_scheduled,
)
from billing.usage.service import flush_pass
from tests.factories import add_accounts, add_events


@pytest.fixture
def billing_runtime(make_runtime, billing_settings):
    """The emulator's summaries are final at once (no lag): trusted at once."""
    return make_runtime(billing_settings.replace(reconcile_settle_seconds=0))


def run(settings, *args):
    runner = create_app(settings).test_cli_runner()
    return runner.invoke(args=["billing", "reconcile", "--json", *args])


def window(hours_back: int = 30):
    now = utcnow()
    return [
        "--since",
        (now - timedelta(hours=hours_back)).strftime("%Y-%m-%dT%H:00:00"),
        "--until",
        floor_hour(now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S"),
    ]


def flushed_usage(runtime):
    customers = add_accounts(runtime, [1, 2])
    now = utcnow()
    add_events(
        runtime,
        [
            {
                "organization_id": org,
                "event_type": "api_call",
                "quantity": q,
                "occurred_at": now - timedelta(hours=h),
            }
            for org, q, h in ((1, 5, 5), (1, 7, 5), (1, 3, 4), (2, 11, 4))
        ],
    )
    assert flush_pass(runtime).submissions_sent == 3
    return customers


def stripe_event(runtime, customer, hour, value):
    """A meter event that reached Stripe outside our outbox (or an attempt we did not record)."""
    runtime.stripe.send_meter_event(
        MeterEvent(
            event_name="api_call",
            stripe_customer_id=customer,
            value=value,
            timestamp=hour,
            identifier=f"x-{uuid.uuid4().hex}",
            idempotency_key=f"x-{uuid.uuid4().hex}",
        )
    )


def held_row(runtime, customer, hour, value, org=1):
    with runtime.session_factory.begin() as session:
        row = UsageSubmission(
            organization_id=org,
            stripe_customer_id=customer,
            event_type="api_call",
            event_name="api_call",
            value=value,
            event_count=1,
            window_start=hour,
            window_end=hour + timedelta(hours=1),
            identifier=f"held-{uuid.uuid4().hex[:8]}",
            status="held",
            attempts=1,
            created_at=utcnow() - timedelta(hours=30),
            last_error="unsent for over 23h",
        )
        session.add(row)
        session.flush()
        return row.id


def row_state(runtime, row_id):
    with runtime.session_factory() as session:
        row = session.get(UsageSubmission, row_id)
        actions = list(
            session.scalars(
                sa.select(UsageSubmissionAction.action).where(
                    UsageSubmissionAction.submission_id == row_id
                )
            )
        )
        return row.status, row.identifier, actions


def test_everything_sent_matches_and_exits_zero(billing_runtime, emulator):
    flushed_usage(billing_runtime)
    result = run(billing_runtime.settings, *window())
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["groups"]["match"] == 3 and report["ok"] and report["problems"] == []


def test_drift_lists_the_rows_behind_it_and_exits_one(billing_runtime, emulator):
    customers = flushed_usage(billing_runtime)
    hour = floor_hour(utcnow() - timedelta(hours=4))
    stripe_event(billing_runtime, customers[2], hour, 4)
    result = run(billing_runtime.settings, *window())
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    (drift,) = report["problems"]
    assert drift["status"] == "drift" and drift["stripe_customer_id"] == customers[2]
    assert (drift["stripe_total"], drift["sent_total"]) == (15, 11)
    assert [(r["status"], r["value"]) for r in drift["rows"]] == [("sent", 11)]
    text = (
        create_app(billing_runtime.settings)
        .test_cli_runner()
        .invoke(args=["billing", "reconcile", *window()])
    )
    assert text.exit_code == 1 and "Stripe 15 outbox sent 11" in text.output


def test_usage_in_stripe_the_outbox_never_sent_is_drift(billing_runtime, emulator):
    customers = flushed_usage(billing_runtime)
    stripe_event(billing_runtime, customers[1], floor_hour(utcnow() - timedelta(hours=9)), 2)
    report = json.loads(run(billing_runtime.settings, *window()).stdout)
    (drift,) = report["problems"]
    assert (drift["stripe_total"], drift["sent_total"], drift["rows"]) == (2, 0, [])


def test_held_row_found_in_stripe_is_marked_sent(billing_runtime, emulator):
    customers = add_accounts(billing_runtime, [1])
    hour = floor_hour(utcnow() - timedelta(hours=26))
    row_id = held_row(billing_runtime, customers[1], hour, 9)
    stripe_event(billing_runtime, customers[1], hour, 9)  # an attempt that did reach Stripe
    result = run(billing_runtime.settings, *window())
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settled"] == {"delivered": 1, "reissued": 0}
    status, _, actions = row_state(billing_runtime, row_id)
    assert status == "sent" and actions == ["reconciled"]
    assert json.loads(run(billing_runtime.settings, *window()).stdout)["problems"] == []


def test_held_row_absent_from_stripe_is_reissued_and_billed_once(billing_runtime, emulator):
    customers = add_accounts(billing_runtime, [1])
    hour = floor_hour(utcnow() - timedelta(hours=26))
    row_id = held_row(billing_runtime, customers[1], hour, 9)
    _, old_identifier, _ = row_state(billing_runtime, row_id)
    result = run(billing_runtime.settings, *window())
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settled"] == {"delivered": 0, "reissued": 1}
    status, identifier, actions = row_state(billing_runtime, row_id)
    assert (status, actions) == ("pending", ["reissue"]) and identifier != old_identifier
    assert flush_pass(billing_runtime).submissions_sent == 1
    assert emulator.billed() == {customers[1]: {"api_call": 9}}
    again = json.loads(run(billing_runtime.settings, *window()).stdout)
    assert again["groups"]["match"] == 1 and again["problems"] == []


def test_an_ambiguous_total_settles_nothing(billing_runtime, emulator):
    customers = add_accounts(billing_runtime, [1])
    hour = floor_hour(utcnow() - timedelta(hours=26))
    row_id = held_row(billing_runtime, customers[1], hour, 9)
    stripe_event(billing_runtime, customers[1], hour, 4)  # neither 0 nor 9: do not guess
    result = run(billing_runtime.settings, *window())
    assert result.exit_code == 1
    (group,) = json.loads(result.stdout)["problems"]
    assert group["status"] == "drift" and group["settled"] is None
    assert row_state(billing_runtime, row_id)[:1] == ("held",)


def test_a_meter_stripe_does_not_know_is_unknown_not_guessed(billing_runtime, emulator):
    customers = add_accounts(billing_runtime, [1])
    hour = floor_hour(utcnow() - timedelta(hours=26))
    row_id = held_row(billing_runtime, customers[1], hour, 9)
    with billing_runtime.session_factory.begin() as session:
        session.execute(sa.update(UsageSubmission).values(event_name="no_such_meter"))
    result = run(billing_runtime.settings, *window())
    assert result.exit_code == 1
    (group,) = json.loads(result.stdout)["problems"]
    assert group["status"] == "unknown" and "no meter" in group["detail"]
    assert row_state(billing_runtime, row_id)[:1] == ("held",)


def test_bad_window_is_a_usage_error(billing_runtime):
    result = run(billing_runtime.settings, "--since", "2026-01-02", "--until", "2026-01-01")
    assert result.exit_code == 2 and "--since must be before --until" in result.output


def test_rows_sent_within_the_settle_lag_are_not_settled_never_drift(
    make_runtime, billing_settings, emulator
):
    """Old hours whose rows were sent just now: Stripe may still be aggregating them."""
    runtime = make_runtime(billing_settings.replace(reconcile_settle_seconds=600))
    customers = flushed_usage(runtime)
    hour = floor_hour(utcnow() - timedelta(hours=4))
    stripe_event(runtime, customers[2], hour, 4)  # the totals differ, but nothing is settled
    result = run(runtime.settings, *window())
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["groups"]["not_settled"] == 3 and report["groups"]["drift"] == 0
    assert {g["status"] for g in report["problems"]} == {"not_settled"}

    since, until = hour - timedelta(hours=2), floor_hour(utcnow())
    later = reconcile(runtime, since, until, now=utcnow() + timedelta(seconds=601))
    assert (later.count("match"), later.count("drift"), later.count("not_settled")) == (2, 1, 0)


def test_the_current_hour_is_not_settled(billing_runtime, emulator):
    """Even with no settle lag, an hour that has not ended can still grow."""
    add_accounts(billing_runtime, [1])
    add_events(
        billing_runtime,
        [{"organization_id": 1, "event_type": "api_call", "quantity": 5, "occurred_at": utcnow()}],
    )
    assert flush_pass(billing_runtime).submissions_sent == 1
    hour = floor_hour(utcnow())
    report = reconcile(billing_runtime, hour, hour + timedelta(hours=1))
    assert report.counts()["not_settled"] == 1 and report.ok


def test_a_run_without_a_window_is_the_scheduled_one_recorded_for_status_and_alerts(
    billing_runtime, emulator
):
    customers = flushed_usage(billing_runtime)
    stripe_event(billing_runtime, customers[2], floor_hour(utcnow() - timedelta(hours=4)), 4)
    started = time.time()
    app = create_app(billing_runtime.settings)
    result = app.test_cli_runner().invoke(args=["billing", "reconcile", "--json"])
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["groups"]["drift"] == 1

    status = app.test_cli_runner().invoke(args=["billing", "status", "--json"])
    recorded = json.loads(status.stdout)["reconcile"]
    assert recorded["source"] == "cli" and recorded["ok"] is False
    assert recorded["groups"] == {
        "match": 2,
        "drift": 1,
        "in_flight": 0,
        "unknown": 0,
        "not_settled": 0,
    }
    text = app.test_cli_runner().invoke(args=["billing", "status"]).stdout
    assert "last reconciliation: " in text and "NEEDS A LOOK (drift 1, " in text

    scraped = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'billing_reconcile_groups{status="drift"} 1.0' in scraped
    assert 'billing_reconcile_groups{status="match"} 2.0' in scraped
    stamp = next(
        line
        for line in scraped.splitlines()
        if line.startswith("billing_reconcile_last_run_timestamp_seconds ")
    )
    assert float(stamp.split()[1]) >= int(started)


def test_a_run_over_a_window_is_an_investigation_not_recorded(billing_runtime, emulator):
    flushed_usage(billing_runtime)
    assert run(billing_runtime.settings, *window()).exit_code == 0
    status = (
        create_app(billing_runtime.settings)
        .test_cli_runner()
        .invoke(args=["billing", "status", "--json"])
    )
    assert json.loads(status.stdout)["reconcile"] is None


def test_the_scheduled_run_logs_its_start_each_drift_and_its_end(billing_runtime, emulator, caplog):
    customers = flushed_usage(billing_runtime)
    hour = floor_hour(utcnow() - timedelta(hours=4))
    stripe_event(billing_runtime, customers[2], hour, 4)
    with caplog.at_level(logging.INFO, logger="billing"):
        report = reconcile_scheduled(billing_runtime, source="schedule")
    assert not report.ok
    lines = {r.message: r for r in caplog.records if r.name == "billing.reconcile"}
    assert lines["Stripe usage reconciliation started"].source == "schedule"
    drift = lines["Stripe usage reconciliation found drift"]
    assert (drift.organization_id, drift.meter, drift.hour) == (2, "api_call", hour.isoformat())
    assert (drift.stripe_total, drift.sent_total) == (15, 11)
    done = lines["Stripe usage reconciliation completed"]
    assert (done.match, done.drift, done.ok) == (2, 1, False)


# Drift the rows explain exactly is marked rejected; any other drift only reported --------------


def late_rows(runtime, org, hour, *quantities):
    """One flush per quantity, each a late event for the same hour: one sent row each."""
    ids = []
    for quantity in quantities:
        add_events(
            runtime,
            [
                {
                    "organization_id": org,
                    "event_type": "api_call",
                    "quantity": quantity,
                    "occurred_at": hour + timedelta(minutes=10),
                }
            ],
        )
        assert flush_pass(runtime).submissions_sent == 1
        with runtime.session_factory() as session:
            ids.append(session.scalar(sa.select(sa.func.max(UsageSubmission.id))))
    return ids


def cancel_in_stripe(runtime, row_id):
    """Stripe no longer counts the row's meter event (as if it had been refused)."""
    with runtime.session_factory() as session:
        identifier = session.get(UsageSubmission, row_id).identifier
    runtime.stripe.client.v1.billing.meter_event_adjustments.create(
        {"event_name": "api_call", "type": "cancel", "cancel": {"identifier": identifier}}
    )


def statuses_of(runtime, ids):
    with runtime.session_factory() as session:
        return [session.get(UsageSubmission, i).status for i in ids]


def test_the_one_set_of_rows_that_makes_up_the_gap_is_marked_rejected_then_billed_once(
    billing_runtime, emulator
):
    customers = add_accounts(billing_runtime, [1])
    hour = floor_hour(utcnow() - timedelta(hours=5))
    ids = late_rows(billing_runtime, 1, hour, 5, 7, 11)
    cancel_in_stripe(billing_runtime, ids[1])

    report = reconcile_scheduled(billing_runtime, source="schedule")
    (group,) = [g for g in report.groups if g.status == "drift"]
    assert (group.stripe, group.total("sent"), group.rejected) == (16, 16, [ids[1]])
    assert "marked rejected" in group.detail and report.to_dict()["rejected_rows"] == 1
    assert statuses_of(billing_runtime, ids) == ["sent", "rejected", "sent"]
    with billing_runtime.session_factory() as session:
        row = session.get(UsageSubmission, ids[1])
        actions = session.scalars(
            sa.select(UsageSubmissionAction).where(UsageSubmissionAction.submission_id == row.id)
        ).all()
    assert row.last_error.startswith("reconcile_missing: not in Stripe's settled summary")
    assert [(a.action, a.actor) for a in actions] == [("reject", "reconcile")]

    # The next run finds the hour matching (the rejected row is not counted as sent), and the
    # gauge follows the record: 1 drift group, then none.
    again = reconcile_scheduled(billing_runtime, source="schedule")
    assert again.counts()["drift"] == 0 and again.ok

    # Re-queued with a new identifier, the row is billed once: Stripe's total = what was sent.
    retry = create_app(billing_runtime.settings).test_cli_runner()
    result = retry.invoke(args=["billing", "submissions", "retry", "--status", "rejected"])
    assert result.exit_code == 0, result.output
    assert flush_pass(billing_runtime).submissions_sent == 1
    assert emulator.billed() == {customers[1]: {"api_call": 23}}
    assert reconcile_scheduled(billing_runtime, source="schedule").counts()["match"] == 1


def test_stripe_holding_none_of_an_hour_marks_every_sent_row_of_it(billing_runtime, emulator):
    add_accounts(billing_runtime, [1])
    hour = floor_hour(utcnow() - timedelta(hours=7))
    ids = late_rows(billing_runtime, 1, hour, 4, 4)
    for row_id in ids:
        cancel_in_stripe(billing_runtime, row_id)
    report = reconcile(billing_runtime, hour, hour + timedelta(hours=1))
    assert [g.rejected for g in report.groups] == [ids]
    assert statuses_of(billing_runtime, ids) == ["rejected", "rejected"]


def test_a_gap_two_sets_of_rows_could_explain_is_reported_never_marked(billing_runtime, emulator):
    add_accounts(billing_runtime, [1])
    hour = floor_hour(utcnow() - timedelta(hours=6))
    ids = late_rows(billing_runtime, 1, hour, 5, 5, 2)
    cancel_in_stripe(billing_runtime, ids[0])
    result = run(billing_runtime.settings, *window())
    assert result.exit_code == 1
    (group,) = json.loads(result.stdout)["problems"]
    assert group["status"] == "drift" and group["rejected"] == []
    assert "no single set of rows makes up the gap of 5: nothing marked" in group["detail"]
    assert statuses_of(billing_runtime, ids) == ["sent", "sent", "sent"]


def test_not_settled_rows_are_never_marked(make_runtime, billing_settings, emulator):
    runtime = make_runtime(billing_settings.replace(reconcile_settle_seconds=600))
    add_accounts(runtime, [1])
    hour = floor_hour(utcnow() - timedelta(hours=3))
    ids = late_rows(runtime, 1, hour, 9)
    cancel_in_stripe(runtime, ids[0])
    report = reconcile(runtime, hour, hour + timedelta(hours=1))
    assert report.counts()["not_settled"] == 1
    assert statuses_of(runtime, ids) == ["sent"]


def value(n):
    return n


def test_missing_rows_is_the_one_set_that_adds_up():
    assert missing_rows([5, 7, 11], 7, value) == [7]
    assert missing_rows([5, 7, 11], 23, value) == [5, 7, 11]
    assert missing_rows([5, 7, 11], 16, value) == [5, 11]
    assert missing_rows([5, 5, 2], 5, value) is None  # either 5
    assert missing_rows([5, 7, 12], 12, value) is None  # 12, or 5 + 7
    assert missing_rows([5, 7], 3, value) is None  # no set: something else is wrong
    many = list(range(1, MAX_ATTRIBUTED_ROWS + 2))
    assert missing_rows(many, sum(many), value) == many  # all missing is proven at once
    assert missing_rows(many, 1, value) is None  # too many to prove the rest
    assert missing_rows([4, 3], 0, value) is None  # Stripe holds it all
    assert missing_rows([10, -4], 6, value) == [10, -4]  # a correction row (issue 26) with it


# Stripe's summaries lagging (the emulator's summary lag, moved by its clock) --------------------

LAG = 30


def test_with_summaries_lagging_the_last_hour_is_not_settled_then_matches(
    make_runtime, billing_settings, emulator
):
    runtime = make_runtime(billing_settings.replace(reconcile_settle_seconds=LAG))
    emulator.settings(summary_lag_seconds=LAG)
    customers = add_accounts(runtime, [1])
    last_hour = floor_hour(utcnow() - timedelta(hours=1))
    add_events(
        runtime,
        [
            {
                "organization_id": 1,
                "event_type": "api_call",
                "quantity": 6,
                "occurred_at": last_hour + timedelta(minutes=20),
            }
        ],
    )
    assert flush_pass(runtime).submissions_sent == 1
    meter = runtime.stripe.meter_by_event_name()["api_call"]
    hour_after = last_hour + timedelta(hours=1)
    # Stripe does not show it yet: judged now, this would be drift.
    assert runtime.stripe.meter_hourly_totals(meter.id, customers[1], last_hour, hour_after) == {}

    since, until = last_hour.strftime("%Y-%m-%dT%H:%M:%S"), hour_after.strftime("%Y-%m-%dT%H:%M:%S")
    result = run(runtime.settings, "--since", since, "--until", until)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["groups"]["not_settled"] == 1 and report["groups"]["drift"] == 0
    (group,) = report["problems"]
    assert group["status"] == "not_settled" and group["rejected"] == []

    emulator.advance(LAG + 1)  # Stripe catches up ...
    later = reconcile(runtime, last_hour, hour_after, now=utcnow() + timedelta(seconds=LAG + 1))
    assert later.counts()["match"] == 1 and later.ok  # ... and the hour is judged: it matches
