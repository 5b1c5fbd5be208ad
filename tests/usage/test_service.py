"""The flush against real PostgreSQL and the Stripe emulator: nothing lost, nothing doubled."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
import sqlalchemy as sa

from billing import logs
from billing.checks.report import GateVerdict
from billing.models import BillingAccount, SubmissionStatus, UsageSubmission, utcnow
from billing.usage.claiming import Claimer
from billing.usage.run import FlushResult, TransientFlushError, UsageFlush, flush_usage
from billing.usage.service import flush_pass
from billing.usage.submitting import Submitter
from tests.factories import (
    add_accounts,
    add_events,
    expected_totals,
    random_events,
    seed_usage,
    submission_statuses,
    unclaimed_count,
)

ORGS = [101, 102, 103, 104, 105]
TYPES = ["api_call", "storage_gb_hour"]


@pytest.fixture
def seeded(billing_runtime):
    return seed_usage(billing_runtime, ORGS, TYPES, 400, hours=8)


def test_billed_totals_equal_the_database_sums(billing_runtime, emulator, seeded):
    customers, rows = seeded
    result = flush_pass(billing_runtime)

    assert result.ok and result.events_claimed == len(rows)
    assert emulator.billed() == expected_totals(rows, customers)
    assert result.billed_value == {
        t: sum(r["quantity"] for r in rows if r["event_type"] == t) for t in TYPES
    }
    statuses = submission_statuses(billing_runtime)
    assert set(statuses) == {"sent"} and statuses["sent"] == result.submissions_sent
    assert unclaimed_count(billing_runtime) == 0


def test_many_small_batches_and_a_second_run_bill_nothing_twice(
    billing_runtime, emulator, seeded, monkeypatch
):
    customers, rows = seeded
    runtime = billing_runtime
    monkeypatch.setattr(Claimer, "GROWTH_LIMIT", 1)  # every batch 37 rows
    runtime.settings = runtime.settings.replace(flush_batch_size=37)
    first = flush_pass(runtime)
    second = flush_pass(runtime)

    assert first.batches == -(-len(rows) // 37) and first.events_claimed == len(rows)
    # Claimed in group order: only a batch's edges split a group into two meter events.
    groups = {
        (
            r["organization_id"],
            r["event_type"],
            r["occurred_at"].replace(minute=0, second=0, microsecond=0),
        )
        for r in rows
    }
    assert len(groups) <= first.submissions_sent <= len(groups) + first.batches
    assert second.events_claimed == 0 and second.submissions_sent == 0
    assert emulator.billed() == expected_totals(rows, customers)


def test_one_outbox_row_per_organization_type_and_hour(billing_runtime, emulator):
    add_accounts(billing_runtime, [1])
    hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    add_events(
        billing_runtime,
        [
            {
                "organization_id": 1,
                "event_type": "api_call",
                "quantity": 2,
                "occurred_at": hour + timedelta(minutes=m),
            }
            for m in (1, 30, 59)
        ]
        + [
            {
                "organization_id": 1,
                "event_type": "api_call",
                "quantity": 5,
                "occurred_at": hour + timedelta(minutes=61),
            }
        ],
    )
    flush_pass(billing_runtime)
    with billing_runtime.session_factory() as session:
        rows = session.execute(
            sa.select(
                UsageSubmission.window_start, UsageSubmission.value, UsageSubmission.event_count
            ).order_by(UsageSubmission.window_start)
        ).all()
    assert rows == [(hour, 6, 3), (hour + timedelta(hours=1), 5, 1)]


class Crash(Exception):
    """Stands for the process dying at a chosen point."""


def _crash_once(monkeypatch, owner: type, method: str) -> None:
    original = getattr(owner, method)
    state = {"crashed": False}

    def crashing(self, work, *args, **kwargs):
        # `_submit`: claimed, nothing sent. `record`: Stripe accepted all, nothing recorded.
        if work and not state["crashed"]:
            state["crashed"] = True
            raise Crash(method)
        return original(self, work, *args, **kwargs)

    monkeypatch.setattr(owner, method, crashing)


@pytest.mark.parametrize(
    "crash_point",
    [(UsageFlush, "_submit"), (Submitter, "record")],
    ids=["after-claim-before-send", "after-stripe-accepted-before-commit"],
)
def test_crash_then_rerun_keeps_totals_exact(
    billing_runtime, emulator, seeded, monkeypatch, crash_point
):
    customers, rows = seeded
    _crash_once(monkeypatch, *crash_point)
    with pytest.raises(Crash):
        flush_pass(billing_runtime)
    assert submission_statuses(billing_runtime)["pending"] > 0

    rerun = flush_pass(billing_runtime)
    assert rerun.ok and unclaimed_count(billing_runtime) == 0
    assert emulator.billed() == expected_totals(rows, customers)
    if crash_point[1] == "record":
        # Every re-send was answered "already exists": delivered, and not counted twice.
        assert rerun.submissions_already_delivered == rerun.submissions_sent > 0


def test_crash_mid_batch_loses_and_doubles_nothing(billing_runtime, emulator, seeded, monkeypatch):
    customers, rows = seeded
    gateway = billing_runtime.stripe
    original = gateway.send_meter_event
    calls = {"n": 0}

    def dies_after_five(event):
        calls["n"] += 1
        if calls["n"] == 6:
            raise Crash("mid-batch")
        return original(event)

    monkeypatch.setattr(gateway, "send_meter_event", dies_after_five)
    with pytest.raises(Crash):
        flush_pass(billing_runtime)
    monkeypatch.setattr(gateway, "send_meter_event", original)

    assert flush_pass(billing_runtime).ok
    assert emulator.billed() == expected_totals(rows, customers)


def test_unbillable_rows_are_reported_and_billed_once_fixed(billing_runtime, emulator):
    customers = add_accounts(billing_runtime, [1])
    now = utcnow()
    recent = now - timedelta(hours=1)
    add_events(
        billing_runtime,
        [
            {"organization_id": 1, "event_type": "api_call", "quantity": 3, "occurred_at": recent},
            {"organization_id": 2, "event_type": "api_call", "quantity": 4, "occurred_at": recent},
            {"organization_id": 1, "event_type": "unmetered", "quantity": 1, "occurred_at": recent},
            {
                "organization_id": 1,
                "event_type": "api_call",
                "quantity": 1,
                "occurred_at": now - timedelta(days=40),
            },
            {
                "organization_id": 1,
                "event_type": "api_call",
                "quantity": 1,
                "occurred_at": now + timedelta(hours=2),
            },
            {"organization_id": 1, "event_type": "api_call", "quantity": 0, "occurred_at": recent},
        ],
    )
    result = flush_pass(billing_runtime)
    assert result.events_claimed == 1
    assert result.unbillable == {
        "no_customer": 1,
        "no_meter": 1,
        "too_old": 1,
        "future": 1,
        "invalid_quantity": 1,
    }
    assert unclaimed_count(billing_runtime) == 5

    # The customer mapping arrives: the next flush bills organization 2's usage.
    customers.update(add_accounts(billing_runtime, [2]))
    later = flush_pass(billing_runtime)
    assert later.events_claimed == 1 and "no_customer" not in later.unbillable
    assert emulator.billed() == {customers[1]: {"api_call": 3}, customers[2]: {"api_call": 4}}


def test_permanent_stripe_error_marks_the_row_failed_and_goes_on(billing_runtime, emulator):
    customers = add_accounts(billing_runtime, [1, 2])
    hour_ago = utcnow() - timedelta(hours=1)
    add_events(
        billing_runtime,
        [
            {"organization_id": org, "event_type": kind, "quantity": n, "occurred_at": hour_ago}
            for org, kind, n in ((1, "api_call", 5), (2, "storage_gb_hour", 7))
        ],
    )
    # A refusal that names nothing beyond the request (a 400 without a param): this row only.
    emulator.faults({"path": "/v1/billing/meter_events", "status": 400, "count": 1})
    result = flush_pass(billing_runtime)
    assert (result.submissions_sent, result.submissions_failed, result.submissions_pending) == (
        1,
        1,
        0,
    )
    assert not result.ok and result.awaiting_operator == {"failed": 1, "held": 0, "rejected": 0}
    with billing_runtime.session_factory() as session:
        failed = session.scalars(
            sa.select(UsageSubmission).where(UsageSubmission.status == "failed")
        ).one()
    assert "InvalidRequestError" in failed.last_error and failed.last_error_scope == "row"
    billed = emulator.billed()
    assert len(billed) == 1 and sum(sum(v.values()) for v in billed.values()) in (5, 7)
    assert set(billed) < set(customers.values())


def test_rate_limited_calls_are_retried_with_backoff(billing_runtime, emulator, seeded):
    customers, rows = seeded
    emulator.faults({"path": "/v1/billing/meter_events", "status": 429, "count": 3})
    result = flush_pass(billing_runtime)
    assert result.ok
    assert emulator.billed() == expected_totals(rows, customers)


def test_server_errors_beyond_retries_leave_rows_pending_for_the_next_run(
    billing_runtime, emulator, seeded
):
    customers, rows = seeded
    emulator.faults({"path": "/v1/billing/meter_events", "status": 500, "count": 1000})
    result = flush_pass(billing_runtime)
    assert result.submissions_pending > 0 and result.submissions_sent == 0
    with pytest.raises(TransientFlushError):
        result.raise_if_transient()

    emulator.faults({"clear": True})
    assert flush_pass(billing_runtime).ok
    assert emulator.billed() == expected_totals(rows, customers)


def test_rows_unsent_past_the_identifier_window_are_held(billing_runtime, emulator, seeded):
    _customers, _rows = seeded
    emulator.faults({"path": "/v1/billing/meter_events", "status": 500, "count": 10_000})
    flush_pass(billing_runtime)
    emulator.faults({"clear": True})
    a_day_later = utcnow() + timedelta(hours=24)
    result = flush_pass(billing_runtime, clock=lambda: a_day_later)

    assert result.submissions_held > 0 and result.submissions_sent == 0
    assert set(submission_statuses(billing_runtime)) == {"held"}
    assert emulator.billed() == {}


def test_disabled_billing_touches_nothing(billing_runtime, emulator, seeded):
    billing_runtime.settings = billing_runtime.settings.replace(billing_enabled=False)
    result = flush_pass(billing_runtime)
    assert (result.enabled, result.events_claimed) == (False, 0)
    assert unclaimed_count(billing_runtime) == 400 and emulator.billed() == {}


@pytest.mark.parametrize("fail_closed", [True, False])
def test_flush_obeys_the_gates_verdict(billing_runtime, emulator, seeded, fail_closed):
    runtime = billing_runtime
    failures = [{"check": "quantity_positive", "offending_rows": 2, "sample_ids": [1, 2]}]
    verdict = GateVerdict(failures, blocks=fail_closed)
    result: FlushResult = flush_usage(
        runtime.settings,
        runtime.session_factory,
        lambda: runtime.stripe,
        contract_gate=lambda: verdict,
    )
    assert result.blocked is fail_closed
    assert result.contract_failures == failures
    assert (unclaimed_count(runtime) == 400) is fail_closed


@pytest.mark.parametrize("fail_closed", [False, True])
def test_the_start_is_logged_before_the_contract_gates_line(billing_runtime, caplog, fail_closed):
    """The gate's warning (or block) came before `Stripe usage flush started`, so it read as
    belonging to the run before."""
    runtime = billing_runtime
    verdict = GateVerdict(
        [{"check": "quantity_positive_integer", "offending_rows": 1, "sample_ids": [7]}],
        blocks=fail_closed,
    )
    with caplog.at_level(logging.INFO, logger="billing"):
        flush_usage(
            runtime.settings,
            runtime.session_factory,
            lambda: runtime.stripe,
            organization_id=None,
            contract_gate=lambda: verdict,
        )
    messages = [r.getMessage() for r in caplog.records if r.name == "billing.usage"]
    gate = logs.FLUSH_BLOCKED if fail_closed else logs.FLUSH_CONTRACT_WARNING
    assert messages.count(logs.FLUSH_STARTED) == 1 and gate in messages
    assert messages.index(logs.FLUSH_STARTED) < messages.index(gate)


def test_log_lines_carry_organization_and_idempotency_key(billing_runtime, emulator, caplog):
    add_accounts(billing_runtime, [9])
    add_events(
        billing_runtime,
        [
            {
                "organization_id": 9,
                "event_type": "api_call",
                "quantity": 1,
                "occurred_at": utcnow() - timedelta(minutes=5),
            }
        ],
    )
    with caplog.at_level(logging.INFO, logger="billing"):
        flush_pass(billing_runtime)
        flush_pass(billing_runtime)
    messages = [r.getMessage() for r in caplog.records]
    for message in (
        logs.FLUSH_STARTED,
        logs.FLUSH_BATCH_STARTED,
        logs.FLUSH_BATCH_COMPLETED,
        logs.METER_SUBMIT_ATTEMPT,
        logs.METER_SUBMIT_SUCCEEDED,
        logs.FLUSH_COMPLETED,
        logs.FLUSH_NO_PENDING,
    ):
        assert message in messages, message
    submit = next(r for r in caplog.records if r.getMessage() == logs.METER_SUBMIT_SUCCEEDED)
    assert submit.organization_id == 9 and submit.idempotency_key.startswith("billing-usage-9-")


def test_embedded_sqlite_flush_bills_exact_totals(sqlite_runtime, emulator):
    runtime = sqlite_runtime
    customers = add_accounts(runtime, [1, 2])
    rows = random_events([1, 2], TYPES, 150)
    add_events(runtime, rows)
    runtime.settings = runtime.settings.replace(flush_batch_size=40)
    result = flush_pass(runtime)
    assert result.ok and result.events_claimed == 150
    assert emulator.billed() == expected_totals(rows, customers)
    assert unclaimed_count(runtime) == 0


def test_outbox_rows_say_sent_with_one_attempt(billing_runtime, emulator, seeded):
    flush_pass(billing_runtime)
    with billing_runtime.session_factory() as session:
        attempts = set(session.scalars(sa.select(UsageSubmission.attempts)))
        sent_at = session.scalars(sa.select(UsageSubmission.sent_at)).all()
    assert attempts == {1} and all(sent_at)
    assert SubmissionStatus.SENT.value == "sent"


def test_an_hour_holding_the_period_boundary_is_split_at_it(billing_runtime, emulator):
    customers = add_accounts(billing_runtime, [1])
    hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    boundary = hour + timedelta(minutes=23)
    with billing_runtime.session_factory.begin() as session:
        account = session.get(BillingAccount, 1)
        account.current_period_start = boundary
        account.current_period_end = boundary + timedelta(days=30)
    add_events(
        billing_runtime,
        [
            {
                "organization_id": 1,
                "event_type": "api_call",
                "quantity": q,
                "occurred_at": hour + timedelta(minutes=m),
            }
            for q, m in ((2, 5), (3, 22), (7, 23), (11, 59), (13, 75))
        ],
    )
    assert flush_pass(billing_runtime).ok
    with billing_runtime.session_factory() as session:
        windows = session.execute(
            sa.select(
                UsageSubmission.window_start, UsageSubmission.window_end, UsageSubmission.value
            ).order_by(UsageSubmission.window_start)
        ).all()
    assert windows == [
        (hour, boundary, 5),  # before the new period: stamped in the old one
        (boundary, hour + timedelta(hours=1), 18),  # stamped at the period start
        (hour + timedelta(hours=1), hour + timedelta(hours=2), 13),
    ]
    assert emulator.billed() == {customers[1]: {"api_call": 36}}


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_batches_split_inside_equal_timestamps_claim_every_row(
    request, emulator, database, monkeypatch
):
    runtime = request.getfixturevalue(
        "billing_runtime" if database == "postgresql" else "sqlite_runtime"
    )
    customers = add_accounts(runtime, [1])
    same_moment = utcnow().replace(microsecond=0) - timedelta(hours=1)
    rows = [
        {"organization_id": 1, "event_type": "api_call", "quantity": n, "occurred_at": same_moment}
        for n in range(1, 26)
    ]
    add_events(runtime, rows)
    runtime.settings = runtime.settings.replace(flush_batch_size=4)
    monkeypatch.setattr(Claimer, "GROWTH_LIMIT", 1)  # every batch 4 rows: 6 cuts in one second
    result = flush_pass(runtime)
    assert result.events_claimed == 25 and result.batches == 7
    assert emulator.billed() == {customers[1]: {"api_call": sum(range(1, 26))}}


@pytest.mark.parametrize(
    ("database", "growth_limit", "batches"),
    # 4 + 8 + 16 + 32, then the last 40; capped at 8x: 4 + 8 + 16 + 32 + 32, then the last 8.
    [("postgresql", None, 5), ("sqlite", None, 5), ("postgresql", 8, 6), ("sqlite", 8, 6)],
)
def test_each_batch_doubles_up_to_the_growth_limit(
    request, emulator, monkeypatch, database, growth_limit, batches
):
    # One organization, one meter, one hour: every batch is a slice of one group, and every cut
    # is one more meter event.
    runtime = request.getfixturevalue(
        "billing_runtime" if database == "postgresql" else "sqlite_runtime"
    )
    customers = add_accounts(runtime, [1])
    hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    rows = [
        {
            "organization_id": 1,
            "event_type": "api_call",
            "quantity": 1 + n % 3,
            "occurred_at": hour + timedelta(seconds=n),
        }
        for n in range(100)
    ]
    add_events(runtime, rows)
    runtime.settings = runtime.settings.replace(flush_batch_size=4)
    if growth_limit:
        monkeypatch.setattr(Claimer, "GROWTH_LIMIT", growth_limit)
    result = flush_pass(runtime)
    assert result.events_claimed == 100 and result.batches == batches
    assert result.submissions_sent == batches
    assert emulator.billed() == {customers[1]: {"api_call": sum(r["quantity"] for r in rows)}}


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_batches_of_distinct_groups_stop_growing_at_the_group_cap(
    request, emulator, monkeypatch, database
):
    # 60 organizations, one event each: every row is a group of its own. With the cap at 8
    # outbox rows a batch: 4, then 8 at a time (uncapped it would be 4 + 8 + 16 + 32).
    runtime = request.getfixturevalue(
        "billing_runtime" if database == "postgresql" else "sqlite_runtime"
    )
    organizations = list(range(1, 61))
    customers = add_accounts(runtime, organizations)
    hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    add_events(
        runtime,
        [
            {"organization_id": org, "event_type": "api_call", "quantity": org, "occurred_at": hour}
            for org in organizations
        ],
    )
    runtime.settings = runtime.settings.replace(flush_batch_size=4)
    monkeypatch.setattr(Claimer, "MAX_BATCH_GROUPS", 8)
    result = flush_pass(runtime)
    assert result.events_claimed == 60 and result.batches == 1 + 56 // 8
    assert result.submissions_sent == 60
    assert emulator.billed() == {customers[org]: {"api_call": org} for org in organizations}
