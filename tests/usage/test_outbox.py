"""`flask billing submissions list|retry|write-off` against PostgreSQL and the emulator: failed and
held rows wait for an operator, and every action is all-or-nothing, audited, and bills once."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa

from billing import create_app
from billing.models import UsageSubmission, UsageSubmissionAction, utcnow
from billing.ops.preflight import run_preflight
from billing.usage.service import flush_pass
from tests.factories import add_accounts, add_events, expected_totals, submission_statuses

METER_EVENTS = "/v1/billing/meter_events"


def invoke(runtime, *args):
    return create_app(runtime.settings).test_cli_runner().invoke(args=["billing", *args])


@pytest.fixture
def usage(billing_runtime):
    """Three organizations, one api_call hour each."""
    customers = add_accounts(billing_runtime, [1, 2, 3])
    rows = [
        {
            "organization_id": org,
            "event_type": "api_call",
            "quantity": 10 * org,
            "occurred_at": utcnow() - timedelta(hours=1),
        }
        for org in (1, 2, 3)
    ]
    add_events(billing_runtime, rows)
    return customers, rows


def _with_status(runtime, status: str) -> list[UsageSubmission]:
    with runtime.session_factory() as session:
        query = sa.select(UsageSubmission).where(UsageSubmission.status == status)
        return list(session.scalars(query.order_by(UsageSubmission.id)))


def _trail(runtime, submission_id: int) -> list[UsageSubmissionAction]:
    with runtime.session_factory() as session:
        query = sa.select(UsageSubmissionAction).where(
            UsageSubmissionAction.submission_id == submission_id
        )
        return list(session.scalars(query.order_by(UsageSubmissionAction.id)))


def _fail_two(runtime, emulator) -> list[UsageSubmission]:
    emulator.faults({"path": METER_EVENTS, "status": 400, "count": 2})
    assert flush_pass(runtime).submissions_failed == 2
    return _with_status(runtime, "failed")


def test_list_shows_failed_rows_with_their_error(billing_runtime, emulator, usage):
    failed = _fail_two(billing_runtime, emulator)
    result = invoke(billing_runtime, "submissions", "list", "--status", "failed", "--json")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    listed = listing["submissions"]
    assert [r["id"] for r in listed] == [r.id for r in failed] and listing["total"] == 2
    assert all(r["status"] == "failed" and r["last_error"] for r in listed)

    table = invoke(billing_runtime, "submissions", "list")
    assert table.exit_code == 0 and table.output.count("failed") == 2
    first = invoke(billing_runtime, "submissions", "list", "--status", "failed", "--limit", "1")
    assert first.stdout.count("failed") == 1 and "oldest 1 of 2 rows" in first.stderr
    org = failed[0].organization_id
    one = invoke(billing_runtime, "submissions", "list", "--status", "failed", "--org-id", str(org))
    assert one.exit_code == 0 and one.output.count("failed") == 1


def test_retry_puts_failed_rows_back_and_the_next_flush_bills_them_once(
    billing_runtime, emulator, usage
):
    customers, rows = usage
    failed = _fail_two(billing_runtime, emulator)
    assert not flush_pass(billing_runtime).ok  # they wait for an operator

    result = invoke(billing_runtime, "submissions", "retry", "--all-failed", "--actor", "ops-ann")
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(result.stdout)["submission_ids"]) == [r.id for r in failed]
    trail = _trail(billing_runtime, failed[0].id)
    assert [(a.action, a.previous_status, a.new_status, a.actor) for a in trail] == [
        ("retry", "failed", "pending", "ops-ann")
    ]
    assert trail[0].previous_error == failed[0].last_error

    after = flush_pass(billing_runtime)
    assert after.ok and after.submissions_sent == 2
    assert emulator.billed() == expected_totals(rows, customers)
    assert set(submission_statuses(billing_runtime)) == {"sent"}
    # Same identifiers as before: the retry re-sends the row, it does not make a new one.
    sent = {r.id: r.identifier for r in _with_status(billing_runtime, "sent")}
    assert all(sent[r.id] == r.identifier for r in failed)


def test_write_off_is_recorded_never_billed_and_no_longer_counts(billing_runtime, emulator, usage):
    customers, rows = usage
    failed = _fail_two(billing_runtime, emulator)
    target = failed[0]
    result = invoke(
        billing_runtime, "submissions", "write-off", str(target.id), "--reason", "test account"
    )
    assert result.exit_code == 0, result.output
    (action,) = _trail(billing_runtime, target.id)
    assert (action.action, action.reason, action.new_status) == (
        "write_off",
        "test account",
        "written_off",
    )
    invoke(billing_runtime, "submissions", "retry", str(failed[1].id))
    after = flush_pass(billing_runtime)
    assert after.ok and after.awaiting_operator == {"failed": 0, "held": 0, "rejected": 0}
    billed_rows = [r for r in rows if r["organization_id"] != target.organization_id]
    assert emulator.billed() == expected_totals(billed_rows, customers)


def test_actions_are_all_or_nothing(billing_runtime, emulator, usage):
    failed = _fail_two(billing_runtime, emulator)
    flush_pass(billing_runtime)
    (sent,) = _with_status(billing_runtime, "sent")
    mixed = [str(failed[0].id), str(sent.id), "999999"]

    refused = invoke(billing_runtime, "submissions", "write-off", *mixed, "--reason", "x")
    assert refused.exit_code == 1
    assert "is sent" in refused.output and "999999 does not exist" in refused.output
    assert "nothing was changed" in refused.output and "Traceback" not in refused.output
    assert len(_with_status(billing_runtime, "failed")) == 2
    assert _trail(billing_runtime, failed[0].id) == []

    assert invoke(billing_runtime, "submissions", "retry", str(sent.id)).exit_code == 1
    assert invoke(billing_runtime, "submissions", "write-off", str(sent.id)).exit_code == 2
    assert invoke(billing_runtime, "submissions", "retry").exit_code == 2


def test_a_held_row_is_refused_unless_reissued_after_reconciliation(
    billing_runtime, emulator, usage
):
    customers, rows = usage
    emulator.faults({"path": METER_EVENTS, "status": 500})
    flush_pass(billing_runtime)
    emulator.faults({"clear": True})
    a_day_later = utcnow() + timedelta(hours=24)
    held_run = flush_pass(billing_runtime, clock=lambda: a_day_later)
    assert held_run.submissions_held == 3 and not held_run.ok
    held = _with_status(billing_runtime, "held")

    refused = invoke(billing_runtime, "submissions", "retry", str(held[0].id))
    assert refused.exit_code == 1 and "Reconcile" in refused.output
    assert len(_with_status(billing_runtime, "held")) == 3

    ids = [str(r.id) for r in held]
    result = invoke(billing_runtime, "submissions", "retry", *ids, "--reissue-held")
    assert result.exit_code == 0, result.output
    trail = _trail(billing_runtime, held[0].id)
    assert trail[0].action == "reissue" and trail[0].previous_identifier == held[0].identifier
    pending = {r.id: r for r in _with_status(billing_runtime, "pending")}
    assert all(pending[r.id].identifier != r.identifier for r in held)

    after = flush_pass(billing_runtime)
    assert after.ok and after.submissions_sent == 3
    assert emulator.billed() == expected_totals(rows, customers)


def test_preflight_fails_while_rows_wait_for_an_operator(billing_runtime, emulator, usage):
    def outbox_check():
        report = run_preflight(billing_runtime, require_enabled=False)
        return next(c for c in report.checks if c.check == "usage_outbox")

    assert outbox_check().status.value == "pass"
    failed = _fail_two(billing_runtime, emulator)
    check = outbox_check()
    assert check.status.value == "fail" and "2 failed, 0 held and 0 rejected" in check.detail
    ids = [str(r.id) for r in failed]
    assert invoke(billing_runtime, "submissions", "write-off", *ids, "--reason", "x").exit_code == 0
    assert outbox_check().status.value == "pass"
