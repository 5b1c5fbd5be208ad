"""Meter events Stripe accepts and refuses afterwards end `rejected`, reach the operator, and are
billed exactly once after the fix.

The emulator validates like live Stripe (`meter_validation` async): a flush's meter events are
answered 200, the ones that fail its checks are not aggregated, and a few seconds later it POSTs
a signed thin event (`v1.billing.meter.error_report_triggered` / `no_meter_found`) to the app
over HTTP; a real Celery worker fetches the full event (`GET /v2/core/events/{id}`) and marks the
rows. Totals are the emulator's billed sums against the outbox's."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
import sqlalchemy as sa

from billing import accounts, create_app, logs
from billing.models import (
    MeterErrorReport,
    UsageSubmission,
    UsageSubmissionAction,
    utcnow,
)
from billing.ops.preflight import run_preflight
from billing.ops.state import read_state
from billing.stripe_gateway import MeterErrorReportEvent, MeterErrorSample
from billing.usage import rejections
from billing.usage.service import flush_pass
from tests.factories import add_accounts, add_events, expected_totals, random_events
from tests.fixtures.webhooks import OLD_SECRET, post, rows, sign, statuses, wait_until
from tests.test_metrics import counter, scrape

ORGS = [11, 12]
TYPES = ["api_call", "storage_gb_hour"]
DELAY = 1  # emulator seconds from the first refused event to its error report
CUSTOMER_NOT_FOUND = "meter_event_customer_not_found"


def invoke(runtime, *args):
    return create_app(runtime.settings).test_cli_runner().invoke(args=["billing", *args])


@pytest.fixture
def async_stripe(emulator, delivering):
    """The emulator as live Stripe, fast: async validation, reports after DELAY, every error
    sampled (the rows a report does not sample are reconciliation's, tested there). Thin events
    come from their own destination, signed with its own secret: STRIPE_WEBHOOK_SECRET lists
    both, as in production."""
    emulator.settings(
        meter_validation="async", error_report_delay_seconds=DELAY, error_report_samples=100
    )
    delivering.configure(thin_secret=OLD_SECRET)
    return delivering


def thin_events(runtime) -> list:
    return [e for e in rows(runtime) if e.type.startswith("v1.billing.meter.")]


def rows_of(runtime, organization_id: int | None = None) -> list[UsageSubmission]:
    query = sa.select(UsageSubmission).order_by(UsageSubmission.id)
    if organization_id is not None:
        query = query.where(UsageSubmission.organization_id == organization_id)
    with runtime.session_factory() as session:
        return list(session.scalars(query))


def trail(runtime, submission_id: int) -> list[tuple[str, str, str, str]]:
    with runtime.session_factory() as session:
        actions = session.scalars(
            sa.select(UsageSubmissionAction)
            .where(UsageSubmissionAction.submission_id == submission_id)
            .order_by(UsageSubmissionAction.id)
        )
        return [(a.action, a.previous_status, a.new_status, a.actor) for a in actions]


def reports(runtime) -> list[MeterErrorReport]:
    with runtime.session_factory() as session:
        return list(session.scalars(sa.select(MeterErrorReport).order_by(MeterErrorReport.id)))


def sent_sums(runtime) -> dict[str, dict[str, int]]:
    """{customer: {event name: SUM(value)}} of the outbox's sent rows: what Stripe must hold."""
    totals: dict[str, Counter] = {}
    for row in rows_of(runtime):
        if row.status == "sent":
            totals.setdefault(row.stripe_customer_id, Counter())[row.event_name] += row.value
    return {customer: dict(sums) for customer, sums in totals.items()}


def wait_rejected(runtime, ids: set[int], timeout: float = 30) -> float:
    """Seconds until every row of `ids` is rejected (the report's delay plus one processing)."""
    started = time.monotonic()
    wait_until(
        lambda: {r.id for r in rows_of(runtime) if r.status == "rejected"} >= ids,
        timeout,
        f"rows {sorted(ids)} to be rejected",
    )
    return time.monotonic() - started


def test_a_deleted_customer_is_rejected_shown_everywhere_and_billed_once_after_relinking(
    async_stripe, webhook_runtime, emulator, captured
):
    runtime = webhook_runtime
    customers = add_accounts(runtime, ORGS)
    usage = random_events(ORGS, TYPES, 60, hours=5)
    add_events(runtime, usage)
    runtime.stripe.client.v1.customers.delete(customers[11])
    rejected_before = counter("billing_meter_events_rejected_total", code=CUSTOMER_NOT_FOUND)

    first = flush_pass(runtime)
    # Stripe answered every event 200: nothing failed or stopped synchronously.
    assert first.submissions_failed == 0 and not first.stopped_customers
    assert first.submissions_sent == len(rows_of(runtime)) and first.ok
    deleted = {r.id for r in rows_of(runtime, 11)}
    seconds = wait_rejected(runtime, deleted)
    assert seconds < DELAY + 10
    async_stripe.settle()
    assert {e.status for e in thin_events(runtime)} == {"processed"}

    # Only the deleted customer's rows, each with Stripe's code and message and a `reject` action.
    rejected = [r for r in rows_of(runtime) if r.status == "rejected"]
    assert {r.id for r in rejected} == deleted
    assert all(r.last_error.startswith(f"{CUSTOMER_NOT_FOUND}: ") for r in rejected)
    assert {r.last_error_scope for r in rejected} == {"customer"}
    assert {r.status for r in rows_of(runtime, 12)} == {"sent"}
    # Each row named by one report's sample (a report covers one meter's errors of a window),
    # every error matched (all sampled here).
    report_of = {
        sample["submission_id"]: (report.stripe_event_id, report.event_name)
        for report in reports(runtime)
        for sample in report.samples
    }
    assert {r.id: trail(runtime, r.id) for r in rejected} == {
        r.id: [("reject", "sent", "rejected", f"stripe:{report_of[r.id][0]}")] for r in rejected
    }
    assert all(report_of[r.id][1] == r.event_name for r in rejected)
    assert all(r.error_count == r.matched == r.sampled for r in reports(runtime))
    assert all(r.reconciled_at is not None for r in reports(runtime))
    assert sum(r.error_count for r in reports(runtime)) == len(deleted)

    # The operator sees them: log lines, status, preflight, the flush's result, the metrics.
    lines = captured.messages(logs.METER_EVENT_REJECTED)
    assert sorted(line.submission_id for line in lines) == sorted(deleted)
    assert {(line.organization_id, line.code) for line in lines} == {(11, CUSTOMER_NOT_FOUND)}
    assert {line.identifier for line in lines} == {r.identifier for r in rejected}
    assert {line.meter for line in lines} == {r.event_name for r in rejected}
    assert all(line.event_id.startswith("evt_") for line in lines)
    assert read_state(runtime).outbox_by_status["rejected"] == len(deleted)
    status = invoke(runtime, "status", "--json")
    assert json.loads(status.stdout)["outbox_by_status"]["rejected"] == len(deleted)
    check = next(
        c for c in run_preflight(runtime, require_enabled=False).checks if c.check == "usage_outbox"
    )
    assert check.status.value == "fail" and f"{len(deleted)} rejected" in check.detail
    waiting = flush_pass(runtime)
    assert not waiting.ok and waiting.awaiting_operator["rejected"] == len(deleted)
    scraped = scrape(runtime.settings)
    assert scraped[("billing_outbox_rows", (("status", "rejected"),))] == len(deleted)
    assert counter("billing_meter_events_rejected_total", code=CUSTOMER_NOT_FOUND) == (
        rejected_before + len(deleted)
    )
    listed = invoke(runtime, "submissions", "list", "--json")
    assert {r["id"] for r in json.loads(listed.stdout)["submissions"]} == deleted

    # The fix: the organization gets a new customer (what a completed Checkout does).
    customers[11] = runtime.stripe.create_customer("Org 11 again", 11).id
    accounts.link_account(runtime, 11, customers[11], None)
    old = {r.id: r.identifier for r in rejected}
    retried = invoke(
        runtime, "submissions", "retry", "--status", "rejected", "--org-id", "11", "--actor", "ann"
    )
    assert retried.exit_code == 0, retried.output
    assert sorted(json.loads(retried.stdout)["submission_ids"]) == sorted(deleted)
    again = {r.id: r for r in rows_of(runtime, 11)}
    assert all(again[i].status == "pending" and again[i].identifier != old[i] for i in deleted)
    assert all(trail(runtime, i)[-1] == ("reissue", "rejected", "pending", "ann") for i in deleted)
    assert len(captured.messages(logs.SUBMISSIONS_REQUEUED_REJECTED)) == len(deleted)

    billed = flush_pass(runtime)
    assert billed.ok and billed.submissions_sent == len(deleted)
    time.sleep(DELAY + 0.5)  # a report, if Stripe refused anything again, would be out by now
    async_stripe.settle()
    assert {r.status for r in rows_of(runtime)} == {"sent"}
    assert {r.stripe_customer_id for r in rows_of(runtime, 11)} == {customers[11]}
    # Exactly once: Stripe's totals are the table's sums and the usage's.
    assert emulator.billed() == sent_sums(runtime) == expected_totals(usage, customers)
    assert sum(r.error_count for r in reports(runtime)) == len(deleted)  # none since


def test_a_re_sent_row_is_found_by_its_rn_key_and_by_a_bare_identifier(
    async_stripe, webhook_runtime, emulator
):
    runtime = webhook_runtime
    customers = add_accounts(runtime, [21, 22])
    hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    add_events(
        runtime,
        [
            {"organization_id": org, "event_type": "api_call", "quantity": 5, "occurred_at": hour}
            for org in (21, 22)
        ],
    )
    # Refused once (a 400 for the row alone): failed, retried by an operator, re-sent under a
    # new key (the refusal and the retry each move it on: -r2).
    emulator.faults({"path": "/v1/billing/meter_events", "status": 400, "count": 2})
    assert flush_pass(runtime).submissions_failed == 2
    assert invoke(runtime, "submissions", "retry", "--all-failed").exit_code == 0
    runtime.stripe.client.v1.customers.delete(customers[21])
    assert flush_pass(runtime).submissions_sent == 2
    (row,) = rows_of(runtime, 21)
    assert row.idempotency_key.endswith("-r2")
    wait_rejected(runtime, {row.id})
    (report,) = reports(runtime)
    assert [s["request_identifier"] for s in report.samples] == [row.idempotency_key]

    # A Stripe that names the meter event's identifier instead of the key: mapped as well.
    emulator.settings(error_report_identifier="identifier")
    runtime.stripe.client.v1.customers.delete(customers[22])
    customers[21] = runtime.stripe.create_customer("Org 21 again", 21).id
    accounts.link_account(runtime, 21, customers[21], None)
    add_events(
        runtime,
        [{"organization_id": 22, "event_type": "api_call", "quantity": 7, "occurred_at": hour}],
    )
    flush_pass(runtime)
    late = max(rows_of(runtime, 22), key=lambda r: r.id)
    wait_rejected(runtime, {late.id})
    assert [s["request_identifier"] for s in reports(runtime)[-1].samples] == [late.identifier]
    assert {r.status for r in rows_of(runtime, 22)} == {"sent", "rejected"}


def test_a_redelivered_or_replayed_report_changes_the_rows_once_and_a_forged_one_nothing(
    async_stripe, webhook_runtime, emulator, app_server
):
    runtime = webhook_runtime
    customers = add_accounts(runtime, [31])
    add_events(runtime, random_events([31], ["api_call"], 4, hours=3))
    runtime.stripe.client.v1.customers.delete(customers[31])
    before = counter("billing_meter_events_rejected_total", code=CUSTOMER_NOT_FOUND)
    flush_pass(runtime)
    ids = {r.id for r in rows_of(runtime, 31)}
    wait_rejected(runtime, ids)
    async_stripe.settle()
    (event,) = thin_events(runtime)
    stored = event.stripe_event_id
    body = json.dumps(event.payload).encode()
    for _ in range(3):  # redelivered: stored once, processed once
        response = post(app_server.url, body, signature=sign(body, OLD_SECRET))
        assert response.status_code == 200 and response.json()["outcome"] == "duplicate"
    replay = invoke(runtime, "webhooks", "replay", stored, "--force")
    assert replay.exit_code == 0, replay.output
    assert all(trail(runtime, i) == [trail(runtime, i)[0]] for i in ids)
    assert all(trail(runtime, i)[0][:3] == ("reject", "sent", "rejected") for i in ids)
    assert len(reports(runtime)) == 1
    assert counter("billing_meter_events_rejected_total", code=CUSTOMER_NOT_FOUND) == before + len(
        ids
    )

    # A thin event that no secret of ours signed: 400, nothing stored, no row changed.
    forged = json.loads(body) | {"id": "evt_test_forged000000000000000000000000000000000"}
    forged_body = json.dumps(forged).encode()
    refused = post(app_server.url, forged_body, signature=sign(forged_body, "whsec_notours0000"))
    assert refused.status_code == 400
    assert [e.stripe_event_id for e in thin_events(runtime)] == [stored]
    assert forged["id"] not in statuses(runtime) and len(reports(runtime)) == 1


def test_an_archived_meter_is_found_and_billed_once_the_mapping_is_fixed(
    async_stripe, webhook_runtime, emulator, make_runtime
):
    runtime = webhook_runtime
    customers = add_accounts(runtime, [41])
    hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    first = [{"organization_id": 41, "event_type": "api_call", "quantity": 9, "occurred_at": hour}]
    add_events(runtime, first)
    api_call = runtime.stripe.meter_by_event_name()["api_call"]

    # (a) Archived before the run: the flush's meter check stops it, nothing leaves the backlog.
    runtime.stripe.client.v1.billing.meters.deactivate(api_call.id)
    stopped = flush_pass(runtime)
    assert "api_call" in stopped.stopped_meters and rows_of(runtime) == []

    # (b) Archived while the send is in flight (after the check): Stripe answers 200 and
    # refuses it asynchronously (`archived_meter`).
    runtime.stripe.client.v1.billing.meters.reactivate(api_call.id)
    emulator.faults({"path": "/v1/billing/meter_events", "latency_ms": 1500, "count": 1})
    archive = threading.Timer(
        0.5, lambda: runtime.stripe.client.v1.billing.meters.deactivate(api_call.id)
    )
    archive.start()
    sent = flush_pass(runtime)
    archive.join()
    assert sent.submissions_sent == 1 and sent.submissions_failed == 0
    (row,) = rows_of(runtime)
    wait_rejected(runtime, {row.id})
    (row,) = rows_of(runtime)
    assert row.last_error.startswith("archived_meter: ") and row.last_error_scope == "meter"
    assert emulator.billed() == {}

    # The fix: STRIPE_BILLING_METERS points api_call at a new meter; the row follows it.
    runtime.stripe.ensure_meter("api_call_v2")
    fixed = make_runtime(
        runtime.settings.replace(
            stripe_meters={"api_call": "api_call_v2", "storage_gb_hour": "storage_gb_hour"}
        )
    )
    result = invoke(fixed, "submissions", "retry", "--status", "rejected", "--meter", "api_call")
    assert result.exit_code == 0 and json.loads(result.stdout)["submission_ids"] == [row.id]
    assert flush_pass(fixed).ok
    time.sleep(DELAY + 0.5)
    async_stripe.settle()
    (row,) = rows_of(fixed)
    assert (row.status, row.event_name) == ("sent", "api_call_v2")
    assert emulator.billed() == {customers[41]: {"api_call_v2": 9}} == sent_sums(fixed)


def test_no_meter_found_rejects_the_rows_of_an_event_name_without_a_meter(
    async_stripe, webhook_runtime, emulator, make_runtime
):
    # STRIPE_BILLING_METERS names an event name Stripe has no meter for, and the flush's meter
    # check could not list the meters (Stripe answered 500 to it): only the report tells.
    runtime = make_runtime(
        webhook_runtime.settings.replace(stripe_meters={"api_call": "api_calls_typo"})
    )
    customers = add_accounts(runtime, [51])
    add_events(runtime, random_events([51], ["api_call"], 3, hours=2))
    retries = runtime.settings.stripe_max_network_retries
    emulator.faults(
        {"path": "/v1/billing/meters", "method": "GET", "status": 500, "count": 1 + retries}
    )
    assert flush_pass(runtime).submissions_sent == len(rows_of(runtime))
    ids = {r.id for r in rows_of(runtime)}
    wait_rejected(runtime, ids)
    (report,) = reports(runtime)
    assert (report.type, report.meter_id) == ("v1.billing.meter.no_meter_found", None)
    assert report.event_name == "api_calls_typo"
    assert {r.last_error.split(":")[0] for r in rows_of(runtime)} == {"no_meter"}
    assert {r.last_error_scope for r in rows_of(runtime)} == {"meter"}
    assert customers and emulator.billed() == {}


def test_samples_are_samples_the_rows_a_report_did_not_name_are_left_to_reconciliation(
    async_stripe, webhook_runtime, emulator
):
    runtime = webhook_runtime
    # One report for all 30 (the window outlasts the sends even on a busy machine).
    emulator.settings(error_report_samples=5, error_report_delay_seconds=3)
    customers = add_accounts(runtime, [91])
    hour = utcnow().replace(minute=0, second=0, microsecond=0)
    add_events(
        runtime,
        [
            {
                "organization_id": 91,
                "event_type": "api_call",
                "quantity": 3,
                "occurred_at": hour - timedelta(hours=n),
            }
            for n in range(1, 31)
        ],
    )
    runtime.stripe.client.v1.customers.delete(customers[91])
    assert flush_pass(runtime).submissions_sent == 30
    wait_until(lambda: reports(runtime), what="the report")
    async_stripe.settle()
    (report,) = reports(runtime)
    assert (report.error_count, report.sampled, report.matched) == (30, 5, 5)
    assert report.reconciled_at is None  # 25 errors unnamed: the reconciliation's to find
    assert report.validation_start <= report.validation_end
    statuses = Counter(r.status for r in rows_of(runtime))
    assert statuses == {"rejected": 5, "sent": 25}


def test_a_rejection_recorded_while_the_batch_is_in_flight_stands(webhook_runtime, emulator):
    """The report can beat the flush's own record of the send (a long batch): the row stays
    rejected, not `sent` by the run that sent it."""
    runtime = webhook_runtime
    add_accounts(runtime, [81])
    add_events(runtime, random_events([81], ["api_call"], 2, hours=1))
    emulator.faults({"path": "/v1/billing/meter_events", "latency_ms": 3000, "count": 1})
    marked: list[bool] = []

    def report_arrives() -> None:
        # As soon as the claim wrote the row: its send takes 3 s, so this beats the record.
        wait_until(lambda: rows_of(runtime), 30, "the outbox row")
        (row,) = rows_of(runtime)
        assert row.status == "pending"
        marked.extend(
            rejections.mark_rejected(runtime, {row.id: (CUSTOMER_NOT_FOUND, "gone")}, "t")
        )

    arrives = threading.Thread(target=report_arrives)
    arrives.start()
    result = flush_pass(runtime)
    arrives.join()
    assert len(marked) == 1  # the report changed the pending row
    assert result.submissions_sent == 1
    (row,) = rows_of(runtime)
    assert (row.status, row.last_error) == ("rejected", f"{CUSTOMER_NOT_FOUND}: gone")
    assert flush_pass(runtime).awaiting_operator["rejected"] == 1


def test_mark_rejected_changes_sent_rows_once_and_leaves_the_others(webhook_runtime, emulator):
    runtime = webhook_runtime
    add_accounts(runtime, [61])
    add_events(runtime, random_events([61], TYPES, 6, hours=3))
    flush_pass(runtime)
    first = rows_of(runtime)[0].id
    marked = rejections.mark_rejected(
        runtime, {first: ("reconcile_missing", "absent from Stripe's summary")}, "reconcile"
    )
    assert marked == [first]
    assert rejections.mark_rejected(runtime, {first: ("x", "y")}, "reconcile") == []
    assert trail(runtime, first) == [("reject", "sent", "rejected", "reconcile")]
    (row,) = [r for r in rows_of(runtime) if r.id == first]
    assert row.last_error == "reconcile_missing: absent from Stripe's summary"
    assert row.last_error_scope == "row"
    written = invoke(runtime, "submissions", "write-off", str(first), "--reason", "test account")
    assert written.exit_code == 0, written.output
    assert rejections.mark_rejected(runtime, {first: ("x", "y")}, "reconcile") == []


IDENTIFIER = "7-api_call-202612011300-0a1b2c3d4e5f"


@pytest.mark.parametrize(
    ("sent", "found"),
    [
        (f"billing-usage-{IDENTIFIER}", (f"billing-usage-{IDENTIFIER}", IDENTIFIER)),
        (f"billing-usage-{IDENTIFIER}-r2", (f"billing-usage-{IDENTIFIER}-r2", IDENTIFIER)),
        (IDENTIFIER, (IDENTIFIER,)),
    ],
)
def test_a_sample_names_an_idempotency_key_with_or_without_rN_or_an_identifier(sent, found):
    assert rejections.identifier_candidates(sent) == found


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_a_report_is_stored_and_mapped_once_on_either_database(request, emulator, database):
    """The storage and mapping alone (the embedded default runs SQLite): a report as the gateway
    returns it, naming one row by its idempotency key, one by its identifier, one of no row."""
    runtime = request.getfixturevalue(
        "billing_runtime" if database == "postgresql" else "sqlite_runtime"
    )
    add_accounts(runtime, [95])
    hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    add_events(
        runtime,
        [
            {"organization_id": 95, "event_type": kind, "quantity": 2, "occurred_at": hour}
            for kind in TYPES
        ],
    )
    flush_pass(runtime)
    first, second = rows_of(runtime)
    now = utcnow()
    report = MeterErrorReportEvent(
        event_id="evt_test_sqlite0000000000000000000000000000000000",
        type="v1.billing.meter.error_report_triggered",
        meter_id="mtr_test_x",
        event_name=first.event_name,
        error_count=3,
        validation_start=now - timedelta(seconds=10),
        validation_end=now,
        summary="There are 3 invalid events",
        samples=(
            MeterErrorSample(CUSTOMER_NOT_FOUND, "gone", first.idempotency_key),
            MeterErrorSample(CUSTOMER_NOT_FOUND, "gone", second.identifier),
            MeterErrorSample(CUSTOMER_NOT_FOUND, "gone", "someone-elses-key"),
        ),
    )
    recorded = rejections.record_report(runtime, report)
    assert (recorded.matched, recorded.rejected, recorded.unmatched) == (
        2,
        sorted([first.id, second.id]),
        ["someone-elses-key"],
    )
    assert rejections.record_report(runtime, report).duplicate
    (stored,) = reports(runtime)
    assert (stored.error_count, stored.sampled, stored.matched, stored.reconciled_at) == (
        3,
        3,
        2,
        None,
    )
    assert [s["outcome"] for s in stored.samples] == ["rejected", "rejected", "unmatched"]
    assert stored.validation_end == now
    assert Counter(r.status for r in rows_of(runtime))["rejected"] == 2
