"""The Celery task on a real worker (in-process thread) over the real Redis broker."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from billing.celery_app import celery_app
from billing.models import utcnow
from billing.ops.state import read_reconcile_record
from billing.runtime import set_runtime
from billing.task_names import FLUSH_HOURLY_TASK, RECONCILE_TASK
from billing.usage.retry_policy import (
    CALLS_PER_ROW_PER_RUN,
    calls_in_pass,
    passes_allowed,
    retry_countdown,
)
from billing.usage.service import flush_pass
from billing.usage.tasks import enqueue_hourly_flush, flush_hourly_usage, reconcile_usage
from tests.conftest import TEST_QUEUE
from tests.factories import (
    add_accounts,
    add_events,
    expected_totals,
    submission_statuses,
    unclaimed_count,
)


@pytest.fixture
def task_runtime(billing_runtime):
    set_runtime(billing_runtime)
    yield billing_runtime
    set_runtime(None)


def _seed(runtime, orgs=(1, 2)):
    customers = add_accounts(runtime, list(orgs))
    rows = [
        {
            "organization_id": org,
            "event_type": "api_call",
            "quantity": 3 + org,
            "occurred_at": utcnow() - timedelta(hours=1),
        }
        for org in orgs
    ]
    add_events(runtime, rows)
    return customers, rows


def _first_pass_calls(settings) -> int:
    return calls_in_pass(0, 1 + settings.task_max_retries)


def _run(settings) -> dict:
    return flush_hourly_usage.apply_async(queue=settings.billing_queue).get(timeout=60)


def test_task_name_and_options_are_the_wire_contract():
    assert flush_hourly_usage.name == FLUSH_HOURLY_TASK
    assert flush_hourly_usage.acks_late


def test_retry_countdown_grows_exponentially_with_full_jitter_up_to_the_cap(settings):
    policy = settings.replace(retry_backoff_seconds=2.0, retry_backoff_max_seconds=10.0)
    for retries, ceiling in ((0, 2.0), (1, 4.0), (2, 8.0), (3, 10.0), (30, 10.0)):
        delays = [retry_countdown(policy, retries) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= ceiling
        assert max(delays) > ceiling / 2  # jittered across the range, not a constant


def test_worker_takes_the_retry_policy_of_the_installed_settings(
    worker, task_runtime, emulator, retries, make_runtime
):
    """The environment says 3 Celery retries (conftest); the injected settings say 1."""
    set_runtime(make_runtime(task_runtime.settings.replace(task_max_retries=1)))
    _seed(task_runtime, orgs=(1,))
    emulator.faults({"path": "/v1/billing/meter_events", "status": 429, "count": 100_000})
    with pytest.raises(RuntimeError, match="still pending after transient"):
        _run(task_runtime.settings)
    assert len(retries) == 1


def test_worker_retries_rate_limited_flush_and_succeeds(worker, task_runtime, emulator, retries):
    customers, rows = _seed(task_runtime)
    # Every call of the first pass is refused (2 rows): it ends pending, the task retries.
    first_pass = _first_pass_calls(task_runtime.settings)
    emulator.faults({"path": "/v1/billing/meter_events", "status": 429, "count": 2 * first_pass})
    result = _run(task_runtime.settings)
    assert result["ok"] and result["submissions_sent"] >= 1
    assert len(retries) >= 1 and "pending after transient" in retries[0]
    assert emulator.billed() == expected_totals(rows, customers)


def test_worker_retries_server_errors_and_succeeds(worker, task_runtime, emulator, retries):
    customers, rows = _seed(task_runtime, orgs=(1,))
    first_pass = _first_pass_calls(task_runtime.settings)
    emulator.faults({"path": "/v1/billing/meter_events", "status": 500, "count": first_pass})
    result = _run(task_runtime.settings)
    assert result["ok"] and len(retries) == 1
    assert emulator.billed() == expected_totals(rows, customers)


@pytest.mark.parametrize("status", [429, 500])
def test_a_persistent_stripe_error_costs_a_row_at_most_the_run_budget(
    worker, task_runtime, emulator, retries, status
):
    _seed(task_runtime, orgs=(1,))
    emulator.faults({"path": "/v1/billing/meter_events", "status": status})
    with pytest.raises(RuntimeError, match="still pending after transient"):
        _run(task_runtime.settings)
    # The task's retries are the run's passes: they share one budget (was 5 calls per execution).
    assert emulator.stats()["requests"]["POST /v1/billing/meter_events"] == CALLS_PER_ROW_PER_RUN
    assert len(retries) == passes_allowed(1 + task_runtime.settings.task_max_retries) - 1


def test_a_refused_key_stops_the_task_without_retries_or_failed_rows(
    worker, task_runtime, emulator, retries, make_runtime
):
    _seed(task_runtime)
    refused = task_runtime.settings.replace(stripe_secret_key="sk_live_" + "notforemulator00")
    set_runtime(make_runtime(refused))
    result = _run(task_runtime.settings)
    assert result["stop_error"] and "AuthenticationError" in result["stop_error"]
    assert not result["ok"] and result["submissions_failed"] == 0
    assert retries == []  # a refused key is not transient: retrying cannot help
    assert submission_statuses(task_runtime) == {} and unclaimed_count(task_runtime) == 2
    assert emulator.billed() == {}


def test_bad_request_marks_row_failed_and_the_flush_completes(worker, task_runtime, emulator):
    customers, rows = _seed(task_runtime, orgs=(1, 2))
    # A refusal about one request (no scope): that row fails, the other is billed.
    emulator.faults({"path": "/v1/billing/meter_events", "status": 400, "count": 1})
    result = _run(task_runtime.settings)
    assert (result["submissions_sent"], result["submissions_failed"]) == (1, 1)
    assert (
        result["awaiting_operator"] == {"failed": 1, "held": 0, "rejected": 0} and not result["ok"]
    )
    assert submission_statuses(task_runtime) == {"sent": 1, "failed": 1}
    assert sum(sum(v.values()) for v in emulator.billed().values()) in {r["quantity"] for r in rows}
    assert set(emulator.billed()) < set(customers.values())


def test_enqueue_hourly_routes_to_the_configured_queue(worker, task_runtime, emulator):
    customers, rows = _seed(task_runtime)
    task_id = enqueue_hourly_flush(task_runtime.settings)
    outcome = celery_app.AsyncResult(task_id).get(timeout=60)
    assert outcome["events_claimed"] == 2
    assert emulator.billed() == expected_totals(rows, customers)


def test_task_skips_when_another_flush_holds_the_lock(worker, task_runtime, emulator, redis_client):
    _seed(task_runtime)
    redis_client.set(task_runtime.settings.flush_lock_key, "another-worker", ex=30)
    result = _run(task_runtime.settings)
    assert result["skipped"] is True and result["events_claimed"] == 0
    assert emulator.billed() == {}


def test_enqueue_uses_the_brokers_and_queue_of_the_given_settings(settings):
    """Not the environment's broker (conftest's): the one in the settings a host app injected."""
    import redis

    from tests.conftest import TEST_BROKER_URL, _redis_db_url

    other_db = int(TEST_BROKER_URL.rsplit("/", 1)[1]) - 1
    other_broker = _redis_db_url(TEST_BROKER_URL, other_db)
    queue = f"{TEST_QUEUE}-injected"
    client = redis.Redis.from_url(other_broker)
    client.delete(queue)
    try:
        enqueue_hourly_flush(settings.replace(celery_broker_url=other_broker, billing_queue=queue))
        assert client.llen(queue) == 1
    finally:
        client.delete(queue)
        client.close()


def test_enqueue_to_an_unreachable_broker_is_one_error_naming_it(settings):
    from billing.usage.tasks import BrokerUnavailableError

    dead = "redis://:s3cret-pw@127.0.0.1:1/0"
    with pytest.raises(BrokerUnavailableError) as raised:
        enqueue_hourly_flush(settings.replace(celery_broker_url=dead))
    assert "127.0.0.1:1" in str(raised.value) and "s3cret-pw" not in str(raised.value)


def test_reconcile_task_name_and_options_are_the_wire_contract():
    assert reconcile_usage.name == RECONCILE_TASK == "billing.usage.reconcile"
    assert reconcile_usage.acks_late and reconcile_usage.ignore_result


def test_the_worker_reconciles_settled_hours_finds_no_drift_and_records_it(
    worker, task_runtime, emulator, make_runtime
):
    """Summaries lag 30 s (the emulator's clock moves them on); the worker judges the hours once
    they settled and finds no drift."""
    lag, settle = 30, 2
    emulator.settings(summary_lag_seconds=lag)
    runtime = make_runtime(task_runtime.settings.replace(reconcile_settle_seconds=settle))
    set_runtime(runtime)
    customers = add_accounts(runtime, [1, 2])
    hours = (2, 3, 5)
    add_events(
        runtime,
        [
            {
                "organization_id": org,
                "event_type": "api_call",
                "quantity": 3 * org + hour,
                "occurred_at": utcnow() - timedelta(hours=hour),
            }
            for org in customers
            for hour in hours
        ],
    )
    assert flush_pass(runtime).submissions_sent == 6
    meter = runtime.stripe.meter_by_event_name()["api_call"]
    start, end = utcnow() - timedelta(hours=8), utcnow()
    shown = runtime.stripe.meter_event_total
    assert shown(meter.id, customers[1], start.replace(second=0), end.replace(second=0)) == 0
    emulator.advance(lag)  # Stripe's summaries catch up
    time.sleep(settle)  # the rows were sent just now: their hours settle `settle` s later
    reconcile_usage.apply_async(queue=runtime.settings.billing_queue)
    deadline = time.monotonic() + 60
    while (record := read_reconcile_record(runtime)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert record is not None, "the worker wrote no reconciliation record"
    assert record["source"] == "schedule" and record["ok"] is True
    assert record["groups"] == {
        "match": 6,
        "drift": 0,
        "in_flight": 0,
        "unknown": 0,
        "not_settled": 0,
    }
