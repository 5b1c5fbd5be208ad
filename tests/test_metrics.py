"""Prometheus metrics: counters at the flush seam, state gauges at scrape time, /metrics, and a
real prefork Celery worker whose children's counts all reach its scrape endpoint."""

from __future__ import annotations

import json
import time
import urllib.request
from datetime import timedelta

import pytest
import redis
import sqlalchemy as sa
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from billing import create_app
from billing.models import BillableEvent, WebhookEvent, utcnow
from billing.usage.lock import LockUnavailableError, RedisFlushLock
from billing.usage.service import flush_guarded, flush_with_retries
from billing.usage.tasks import flush_hourly_usage
from tests.factories import add_accounts, add_events
from tests.fixtures.processes import (
    celery_worker_args,
    contract_breaking_usage,
    free_port,
    settings_env,
    wait_for_http,
    worker_queue,
)
from tests.process import billing_env, run_flask


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(settings) -> dict[tuple[str, tuple], float]:
    response = create_app(settings).test_client().get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    return samples(response.get_data(as_text=True))


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def usage(runtime, orgs=(1, 2), hours_ago=1):
    customers = add_accounts(runtime, list(orgs))
    add_events(
        runtime,
        [
            {
                "organization_id": org,
                "event_type": "api_call",
                "quantity": 10 * org,
                "occurred_at": utcnow() - timedelta(hours=hours_ago),
            }
            for org in orgs
        ],
    )
    return customers


def test_a_flush_is_counted_and_recorded_for_the_state_gauges(billing_runtime, emulator):
    usage(billing_runtime)
    before = {
        "ok": counter("billing_flush_runs_total", result="ok"),
        "units": counter("billing_units_billed_total", meter="api_call"),
        "claimed": counter("billing_events_claimed_total"),
        "sent": counter("billing_meter_events_sent_total"),
        "flushes": counter("billing_flush_duration_seconds_count"),
    }
    pending = scrape(billing_runtime.settings)
    assert pending[("billing_unclaimed_events", ())] == 2
    assert 3500 < pending[("billing_oldest_unbilled_event_age_seconds", ())] < 3700
    assert ("billing_flush_last_success_timestamp_seconds", ()) not in pending

    started = time.time()
    assert flush_guarded(billing_runtime).ok

    assert counter("billing_flush_runs_total", result="ok") == before["ok"] + 1
    assert counter("billing_units_billed_total", meter="api_call") == before["units"] + 30
    assert counter("billing_events_claimed_total") == before["claimed"] + 2
    assert counter("billing_meter_events_sent_total") == before["sent"] + 2
    assert counter("billing_flush_duration_seconds_count") == before["flushes"] + 1
    after = scrape(billing_runtime.settings)
    assert after[("billing_state_up", ())] == 1
    assert after[("billing_unclaimed_events", ())] == 0
    assert after[("billing_oldest_unbilled_event_age_seconds", ())] == 0
    assert after[("billing_outbox_rows", (("status", "pending"),))] == 0
    assert after[("billing_outbox_rows", (("status", "held"),))] == 0
    assert after[("billing_flush_last_success_timestamp_seconds", ())] >= int(started)
    assert after[("billing_flush_lock_held_seconds", ())] == 0
    assert after[("billing_flush_runs_total", (("result", "ok"),))] == before["ok"] + 1


def test_runs_skipped_by_a_held_lock_are_counted_in_a_row(billing_runtime, redis_client, emulator):
    settings = billing_runtime.settings
    stuck = RedisFlushLock(redis_client, settings.flush_lock_key, 30, lease_seconds=5)
    assert stuck.acquire()
    try:
        skipped_before = counter("billing_flush_runs_total", result="skipped_lock")
        for _ in range(3):
            assert flush_guarded(billing_runtime).skipped
        assert counter("billing_flush_runs_total", result="skipped_lock") == skipped_before + 3
        state = scrape(settings)
        assert state[("billing_flush_consecutive_lock_skips", ())] == 3
        assert state[("billing_flush_lock_held_seconds", ())] >= 0
    finally:
        stuck.release()
    assert flush_guarded(billing_runtime).ok
    assert scrape(settings)[("billing_flush_consecutive_lock_skips", ())] == 0


def test_redis_unreachable_is_retried_counted_and_recorded(billing_runtime):
    billing_runtime.__dict__["redis"] = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    before = counter("billing_flush_runs_total", result="lock_unavailable")
    with pytest.raises(LockUnavailableError):
        flush_with_retries(billing_runtime)
    # tenacity's 3 attempts: the error is transient now, like Stripe's 5xx.
    assert counter("billing_flush_runs_total", result="lock_unavailable") == before + 3
    assert scrape(billing_runtime.settings)[("billing_flush_consecutive_lock_unavailable", ())] == 3


def test_runs_from_cron_reach_the_scrape_of_another_process(billing_runtime, emulator):
    """Cron's commands are short-lived processes: their counters die with them, their records
    in the database reach the web app's scrape (and the alerts that read it)."""
    settings = billing_runtime.settings
    contract_breaking_usage(billing_runtime)
    env = billing_env(settings)
    redis_down = {**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    started = int(time.time())
    before = scrape(settings)
    assert ("billing_contract_last_validation_failed_checks", ()) not in before

    validation = run_flask(env, "validate_contract", "--fail-closed")
    flush = run_flask(redis_down, "flush_hourly")
    assert validation.returncode == 1, validation.stdout + validation.stderr
    assert flush.returncode == 1 and json.loads(flush.stdout)["ok"] is False, flush.stderr

    after = scrape(settings)
    assert after[("billing_contract_last_validation_failed_checks", ())] == 2
    assert after[("billing_contract_last_validation_timestamp_seconds", ())] >= started
    assert after[("billing_flush_consecutive_lock_unavailable", ())] == 3  # 3 passes
    assert after[("billing_flush_last_run_timestamp_seconds", ())] >= started
    for counted in ("billing_contract_validations_total", "billing_flush_runs_total"):
        gone = {k: v for k, v in after.items() if k[0] == counted and v != before.get(k)}
        assert gone == {}, gone  # what the alerts could not read: the processes' counters

    # While Redis is down for the web app too, the database's gauges still come.
    blind = scrape(settings.replace(redis_url=redis_down["REDIS_URL"]))
    assert blind[("billing_state_up", ())] == 0
    assert blind[("billing_flush_consecutive_lock_unavailable", ())] == 3
    assert ("billing_flush_lock_held_seconds", ()) not in blind

    # Fixed: the next runs clear both.
    with billing_runtime.session_factory.begin() as session:
        session.execute(sa.delete(BillableEvent))
    assert run_flask(env, "validate_contract", "--fail-closed").returncode == 0
    assert run_flask(env, "flush_hourly").returncode == 0
    cleared = scrape(settings)
    assert cleared[("billing_contract_last_validation_failed_checks", ())] == 0
    assert cleared[("billing_flush_consecutive_lock_unavailable", ())] == 0
    assert cleared[("billing_flush_last_success_timestamp_seconds", ())] >= started


def test_dead_letters_and_a_database_outage_at_scrape_time(billing_runtime, settings):
    with billing_runtime.session_factory.begin() as session:
        for n, status in enumerate(["failed", "failed", "processed", "received"]):
            session.add(
                WebhookEvent(
                    stripe_event_id=f"evt_{n}", type="invoice.created", payload={}, status=status
                )
            )
    state = scrape(billing_runtime.settings)
    assert state[("billing_webhook_dead_letters", ())] == 2
    assert state[("billing_webhook_events", (("status", "received"),))] == 1
    assert ("billing_webhook_events", (("status", "processed"),)) not in state

    down = scrape(settings.replace(database_url="postgresql://nobody@127.0.0.1:1/none"))
    assert down[("billing_state_up", ())] == 0
    assert ("billing_webhook_dead_letters", ()) not in down


def test_metrics_path_is_configurable_and_can_be_turned_off(settings):
    assert (
        create_app(settings.replace(metrics_path=None)).test_client().get("/metrics").status_code
        == 404
    )
    moved = create_app(settings.replace(metrics_path="/internal/metrics")).test_client()
    assert moved.get("/internal/metrics").status_code == 200


def test_prefork_children_counts_all_reach_the_worker_scrape(
    billing_settings, billing_runtime, emulator, processes, tmp_path
):
    """Each task runs in a fresh child (max 1 task per child): their counts must all add up."""
    usage(billing_runtime)
    port, queue = free_port(), worker_queue()
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    env = settings_env(
        billing_settings.replace(billing_queue=queue),
        PROMETHEUS_MULTIPROC_DIR=str(multiproc),
        BILLING_WORKER_METRICS_PORT=str(port),
    )
    processes.start(
        "worker",
        celery_worker_args(queue, "-P", "prefork", "-c", "2", "--max-tasks-per-child", "1"),
        env,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    wait_for_http(url)
    runs = 4
    for _ in range(runs):
        flush_hourly_usage.apply_async(queue=queue).get(timeout=60)
    with urllib.request.urlopen(url, timeout=10) as response:
        scraped = samples(response.read().decode())
    child_files = {p.name for p in multiproc.glob("counter_*.db")}
    assert len(child_files) >= runs, child_files  # one file per child that ran a task
    assert scraped[("billing_flush_runs_total", (("result", "ok"),))] == runs
    assert scraped[("billing_units_billed_total", (("meter", "api_call"),))] == 30
    assert scraped[("billing_events_claimed_total", ())] == 2
    assert scraped[("billing_flush_duration_seconds_count", ())] == runs
    # State gauges come from the web app: the worker's parent never touches the database.
    assert ("billing_state_up", ()) not in scraped
