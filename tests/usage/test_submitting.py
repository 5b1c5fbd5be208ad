"""Submitting on its own: load in chunks, send through lanes, record set-based; a late or
redelivered submit never sends a row twice and never sets a sent row back. Real PostgreSQL and
the emulator over HTTP."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa

from billing import logs
from billing.models import UsageSubmission, begin_record, pending_among, utcnow
from billing.stripe_gateway import ErrorScope
from billing.usage.result import FlushResult
from billing.usage.service import flush_pass
from billing.usage.submitting import (
    SKIPPED,
    STOPPED,
    Attempt,
    OutboxRow,
    Stops,
    Submitter,
)
from tests.factories import (
    add_accounts,
    add_events,
    expected_totals,
    random_events,
    rate_limited,
)

ORGS = [21, 22, 23, 24]
TYPES = ["api_call", "storage_gb_hour"]
METER_EVENTS = "POST /v1/billing/meter_events"


@pytest.fixture
def claimed(billing_runtime, emulator):
    """Events claimed into pending outbox rows by a pass that sent nothing: (customers, rows,
    outbox ids)."""
    customers = add_accounts(billing_runtime, ORGS)
    rows = random_events(ORGS, TYPES, 240, hours=6)
    add_events(billing_runtime, rows)
    assert flush_pass(billing_runtime, call_attempts=0).events_claimed == len(rows)
    return customers, rows, _ids(billing_runtime)


def _ids(runtime, status: str | None = None) -> list[int]:
    query = sa.select(UsageSubmission.id).order_by(UsageSubmission.id)
    if status:
        query = query.where(UsageSubmission.status == status)
    with runtime.session_factory() as session:
        return list(session.scalars(query))


def _submitter(runtime, result: FlushResult | None = None, **kwargs) -> Submitter:
    return Submitter(
        runtime.settings,
        runtime.session_factory,
        runtime.stripe,
        kwargs.pop("stops", None) or Stops(),
        result or FlushResult(),
        organization_id=None,
        clock=utcnow,
        call_attempts=kwargs.pop("call_attempts", 5),
        **kwargs,
    )


def _calls(emulator) -> int:
    return emulator.stats()["requests"].get(METER_EVENTS, 0)


def _row(runtime, submission_id: int) -> UsageSubmission:
    with runtime.session_factory() as session:
        return session.get(UsageSubmission, submission_id)


def test_rows_load_in_chunks_of_the_batch_size_and_only_while_pending(billing_runtime, claimed):
    _customers, _rows, ids = claimed
    billing_runtime.settings = billing_runtime.settings.replace(flush_batch_size=7)
    with billing_runtime.session_factory.begin() as session:
        session.get(UsageSubmission, ids[3]).status = "sent"
    submitter = _submitter(billing_runtime)
    try:
        chunks = list(submitter.load(ids))
    finally:
        submitter.close()
    assert all(len(chunk) <= 7 for chunk in chunks) and len(chunks) == -(-len(ids) // 7)
    loaded = [row.id for chunk in chunks for row in chunk]
    assert loaded == [i for i in ids if i != ids[3]]
    assert all(isinstance(row, OutboxRow) for chunk in chunks for row in chunk)


def test_pending_ids_are_read_in_pages_and_an_earlier_runs_rows_re_sent_once(
    billing_runtime, emulator, claimed, monkeypatch
):
    _customers, _rows, ids = claimed
    with billing_runtime.session_factory.begin() as session:
        session.get(UsageSubmission, ids[4]).status = "failed"
    monkeypatch.setattr(Submitter, "PENDING_ID_PAGE", 3)
    submitter = _submitter(billing_runtime)
    try:
        assert list(submitter.pending_submission_ids()) == [i for i in ids if i != ids[4]]
    finally:
        submitter.close()
    result = flush_pass(billing_runtime)  # an earlier run's pending rows go first
    assert result.submissions_sent == len(ids) - 1 and _calls(emulator) == len(ids) - 1
    assert _ids(billing_runtime, "sent") == [i for i in ids if i != ids[4]]


def test_a_redelivered_submit_of_the_same_ids_sends_nothing_twice(
    billing_runtime, emulator, claimed
):
    customers, rows, ids = claimed
    first, again = FlushResult(), FlushResult()
    for result in (first, again):
        submitter = _submitter(billing_runtime, result)
        try:
            submitter.submit(ids)
        finally:
            submitter.close()
    assert first.submissions_sent == len(ids) and again.submissions_sent == 0
    assert _calls(emulator) == len(ids)
    assert emulator.billed() == expected_totals(rows, customers)
    assert _ids(billing_runtime, "sent") == ids


def test_two_submits_of_the_same_ids_at_once_bill_each_row_once(billing_runtime, emulator, claimed):
    """A redelivered task running beside the first: both may send a row; Stripe's identifier
    makes the second an "already exists", and every row ends sent, none failed."""
    customers, rows, ids = claimed
    results = [FlushResult(), FlushResult()]
    start = threading.Barrier(2)

    def submit(result: FlushResult) -> None:
        submitter = _submitter(billing_runtime, result)
        try:
            start.wait()
            submitter.submit(ids)
        finally:
            submitter.close()

    threads = [threading.Thread(target=submit, args=(r,)) for r in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert emulator.billed() == expected_totals(rows, customers)
    assert _ids(billing_runtime, "sent") == ids
    assert sum(r.submissions_failed + r.submissions_pending for r in results) == 0
    sent = sum(r.submissions_sent - r.submissions_already_delivered for r in results)
    assert sent == len(ids)  # each row accepted once; any second send was "already delivered"


@pytest.mark.parametrize("outcome", ["pending", "failed", STOPPED, SKIPPED])
def test_record_never_moves_a_row_that_is_no_longer_pending(billing_runtime, claimed, outcome):
    """What a late submit learnt (a transient error, a refusal, a stop) must not undo what
    another submit recorded: the sent row stays sent, its attempts and key unchanged."""
    _customers, _rows, ids = claimed
    submitter = _submitter(billing_runtime)
    try:
        [chunk] = list(submitter.load(ids[:2]))
        submitter.record([Attempt(chunk[0], "accepted")])  # another submit sent it
        before = _row(billing_runtime, ids[0])
        submitter.record([Attempt(chunk[0], outcome, "StripeError: late", ErrorScope.METER)])
    finally:
        submitter.close()
    after = _row(billing_runtime, ids[0])
    assert before.status == after.status == "sent"
    assert (after.attempts, after.key_generation, after.last_error) == (
        before.attempts,
        before.key_generation,
        None,
    )
    assert _row(billing_runtime, ids[1]).status == "pending"


def test_delivered_rows_are_recorded_in_one_statement(billing_runtime, emulator, claimed):
    _customers, _rows, ids = claimed
    updates: list[int] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE USAGE_SUBMISSIONS"):
            updates.append(len(parameters) if executemany else 1)

    sa.event.listen(billing_runtime.engine, "before_cursor_execute", count)
    submitter = _submitter(billing_runtime)
    try:
        submitter.submit(ids)
    finally:
        submitter.close()
        sa.event.remove(billing_runtime.engine, "before_cursor_execute", count)
    assert updates == [1]  # one UPDATE … WHERE id = ANY(…) AND status = 'pending'
    with billing_runtime.session_factory() as session:
        rows = session.execute(
            sa.select(UsageSubmission.attempts, UsageSubmission.sent_at).where(
                UsageSubmission.id.in_(ids)
            )
        ).all()
    assert {attempts for attempts, _ in rows} == {1} and all(sent for _, sent in rows)


def test_each_rows_lines_keep_their_order_fields_and_bound_context(
    billing_runtime, emulator, claimed, caplog
):
    _customers, _rows, ids = claimed
    emulator.faults({"path": "/v1/billing/meter_events", "status": 429, "count": 3})
    settings = billing_runtime.settings
    billing_runtime.settings = settings.replace(retry_backoff_seconds=0.001)
    limited_before = rate_limited("v1")
    submitter = _submitter(billing_runtime)
    try:
        with caplog.at_level(logging.INFO, logger="billing"), logs.bind(task_id="t-25"):
            submitter.submit(ids)
    finally:
        submitter.close()
    lines = [
        r
        for r in caplog.records
        if r.getMessage() in (logs.METER_SUBMIT_ATTEMPT, logs.METER_SUBMIT_SUCCEEDED)
    ]
    by_row: dict[str, list[logging.LogRecord]] = {}
    for record in lines:
        by_row.setdefault(record.identifier, []).append(record)
    assert len(by_row) == len(ids)
    retried = 0
    for records in by_row.values():
        *tries, last = records
        assert last.getMessage() == logs.METER_SUBMIT_SUCCEEDED and last.outcome == "accepted"
        assert [r.getMessage() for r in tries] == [logs.METER_SUBMIT_ATTEMPT] * len(tries)
        assert [r.attempt for r in tries] == list(range(1, len(tries) + 1))
        assert all(r.task_id == "t-25" and r.organization_id in ORGS for r in records)
        assert records == sorted(records, key=lambda r: r.created)
        retried += len(tries) - 1
    assert retried == 3  # the three 429s, each retried by its own row
    assert rate_limited("v1") - limited_before == 3


def test_a_lane_that_raises_stops_the_other_lanes_taking_keys(billing_runtime, emulator):
    orgs = list(range(301, 341))
    add_accounts(billing_runtime, orgs)
    hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    add_events(
        billing_runtime,
        [
            {"organization_id": org, "event_type": "api_call", "quantity": 1, "occurred_at": hour}
            for org in orgs
        ],
    )
    flush_pass(billing_runtime, call_attempts=0)
    ids = _ids(billing_runtime)  # 40 keys of one row each
    billing_runtime.settings = billing_runtime.settings.replace(submit_concurrency=2)
    gateway = billing_runtime.stripe
    original = gateway.send_meter_event
    calls = {"n": 0}

    def dies_at_the_tenth(event):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("lane died")
        return original(event)

    gateway.send_meter_event = dies_at_the_tenth
    submitter = _submitter(billing_runtime)
    try:
        with pytest.raises(RuntimeError, match="lane died"):
            submitter.submit(ids)
    finally:
        submitter.close()
    # The other lane finishes the key it holds, then takes no new one.
    assert 10 <= calls["n"] <= 11 and len(ids) == len(orgs)
    assert _ids(billing_runtime, "sent") == []  # nothing recorded: the next run re-sends


OUTBOX_COLUMNS = (
    "organization_id, stripe_customer_id, event_type, event_name, value, event_count,"
    " window_start, window_end, identifier, status, attempts, created_at, updated_at,"
    " key_generation"
)
OUTBOX_ROWS = sa.text(
    f"INSERT INTO usage_submissions ({OUTBOX_COLUMNS}) SELECT g, 'cus_' || g, 'api_call',"
    " 'api_requests', 1, 1, now(), now(), 'plan-' || g, :status, 0, now(), now(), 0"
    " FROM generate_series(:first, :last) g"
)


def _plan(connection, statement) -> str:
    compiled = statement.compile(connection)
    explained = connection.exec_driver_sql(f"EXPLAIN {compiled.string}", compiled.params)
    return "\n".join(line for (line,) in explained)


def test_a_record_finds_its_rows_by_primary_key_while_statistics_count_few_pending(
    billing_runtime,
):
    # An outbox of 20,000 sent rows, analysed, then a claim of 20,000 pending rows: every large
    # claim is in this state until autovacuum analyses again. With `status = 'pending'` as its
    # guard the planner took the partial index of pending rows (estimated nearly empty) and read
    # all of them for a record of 1,000 (docs/performance.md, "Claiming a million groups").
    with billing_runtime.engine.begin() as connection:
        connection.execute(OUTBOX_ROWS, {"first": 1, "last": 20_000, "status": "sent"})
        connection.execute(sa.text("ANALYZE usage_submissions"))
        connection.execute(OUTBOX_ROWS, {"first": 20_001, "last": 40_000, "status": "pending"})
        ids = connection.scalars(
            sa.select(UsageSubmission.id).order_by(UsageSubmission.id).offset(30_000).limit(1_000)
        ).all()
        record = (
            sa.update(UsageSubmission).where(pending_among(ids, "postgresql")).values(status="sent")
        )
        plan = _plan(connection, record)
        updated = connection.execute(record).rowcount
    assert "Index Scan using pk_usage_submissions" in plan, plan
    assert "ix_usage_submissions_unsent" not in plan, plan
    assert updated == 1_000


def test_a_record_visits_its_rows_in_id_order_on_a_small_outbox_too(billing_runtime):
    # Forty rows: a sequential scan is the cheapest plan, and it would lock the rows in heap
    # order, not in the id order `mark_rejected` locks them in (a deadlock between the two).
    with billing_runtime.session_factory.begin() as session:
        connection = session.connection()
        connection.execute(OUTBOX_ROWS, {"first": 1, "last": 40, "status": "pending"})
        connection.execute(sa.text("ANALYZE usage_submissions"))
        ids = connection.scalars(sa.select(UsageSubmission.id)).all()[5:25]
        record = sa.update(UsageSubmission).where(pending_among(ids, "postgresql"))
        default_plan = _plan(connection, record.values(status="sent"))
        assert begin_record(session) == "postgresql"
        assert connection.scalar(sa.text("SHOW synchronous_commit")) == "off"
        recorded_plan = _plan(connection, record.values(status="sent"))
        updated = connection.execute(record.values(status="sent")).rowcount
    assert "Seq Scan" in default_plan, default_plan  # what the record is kept from
    assert "Index Scan using pk_usage_submissions" in recorded_plan, recorded_plan
    assert updated == 20
