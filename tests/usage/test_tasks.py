"""The Celery task on a real worker (in-process thread) over the real Redis broker."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery.contrib.testing.worker import start_worker
from celery.signals import task_retry

from billing.celery_app import celery_app
from billing.models import utcnow
from billing.runtime import set_runtime
from billing.tasks import (
    FLUSH_HOURLY_TASK,
    enqueue_hourly_flush,
    flush_hourly_usage,
    retry_countdown,
)
from billing.usage import CALL_ATTEMPTS
from tests.conftest import TEST_QUEUE
from tests.usage.factories import add_accounts, add_events, expected_totals, submission_statuses


@pytest.fixture(scope="module")
def worker():
    celery_app.conf.result_backend_transport_options = {"retry_policy": {"max_retries": 1}}
    with start_worker(
        celery_app, perform_ping_check=False, queues=[TEST_QUEUE], shutdown_timeout=5
    ) as w:
        yield w


@pytest.fixture
def task_runtime(billing_runtime):
    set_runtime(billing_runtime)
    yield billing_runtime
    set_runtime(None)


@pytest.fixture
def retries():
    seen: list[str] = []

    def record(sender=None, request=None, reason=None, **_):
        seen.append(str(reason))

    task_retry.connect(record, weak=False)
    yield seen
    task_retry.disconnect(record)


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
    # Every call of the first pass is refused (5 tries x 2 rows): it ends pending, the task retries.
    emulator.faults({"path": "/v1/billing/meter_events", "status": 429, "count": 2 * CALL_ATTEMPTS})
    result = _run(task_runtime.settings)
    assert result["ok"] and result["submissions_sent"] >= 1
    assert len(retries) >= 1 and "pending after transient" in retries[0]
    assert emulator.billed() == expected_totals(rows, customers)


def test_worker_retries_server_errors_and_succeeds(worker, task_runtime, emulator, retries):
    customers, rows = _seed(task_runtime, orgs=(1,))
    emulator.faults({"path": "/v1/billing/meter_events", "status": 500, "count": 3})
    result = _run(task_runtime.settings)
    assert result["ok"] and len(retries) == 1
    assert emulator.billed() == expected_totals(rows, customers)


def test_bad_request_marks_row_failed_and_the_flush_completes(worker, task_runtime, emulator):
    from billing.models import BillingAccount

    customers, rows = _seed(task_runtime, orgs=(1,))
    with task_runtime.session_factory.begin() as session:
        session.add(BillingAccount(organization_id=2, stripe_customer_id="cus_missing"))
    add_events(
        task_runtime,
        [
            {
                "organization_id": 2,
                "event_type": "api_call",
                "quantity": 9,
                "occurred_at": utcnow() - timedelta(hours=1),
            }
        ],
    )
    result = _run(task_runtime.settings)
    assert (result["submissions_sent"], result["submissions_failed"]) == (1, 1)
    assert submission_statuses(task_runtime) == {"sent": 1, "failed": 1}
    assert emulator.billed() == expected_totals(rows, customers)


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
    from billing.tasks import BrokerUnavailableError

    dead = "redis://:s3cret-pw@127.0.0.1:1/0"
    with pytest.raises(BrokerUnavailableError) as raised:
        enqueue_hourly_flush(settings.replace(celery_broker_url=dead))
    assert "127.0.0.1:1" in str(raised.value) and "s3cret-pw" not in str(raised.value)
