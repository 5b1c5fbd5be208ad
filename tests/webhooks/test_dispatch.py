"""Processing on a real Celery worker: retries, dead letters, replay, exclusivity, the sweep."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import requests

from billing import logs
from billing.models import utcnow
from billing.task_names import WEBHOOK_PROCESS_TASK as PROCESS_TASK
from billing.task_names import WEBHOOK_SWEEP_TASK as SWEEP_TASK
from billing.webhooks import handlers, service
from billing.webhooks.publish import enqueuer
from billing.webhooks.tasks import process_webhook, sweep_webhooks
from tests.fixtures.webhooks import (
    make_event,
    post,
    rows,
    sign,
    standalone_app,
    statuses,
    wait_until,
)


class Calls:
    """A test handler registered for `test.*` types; counts calls, fails as told."""

    def __init__(self) -> None:
        self.count = 0
        self.failures: list[Exception] = []
        self.delay = 0.0
        self.lock = threading.Lock()

    def __call__(self, runtime, event) -> None:
        with self.lock:
            self.count += 1
            failure = self.failures.pop(0) if self.failures else None
        time.sleep(self.delay)
        if failure is not None:
            raise failure


@pytest.fixture
def calls(monkeypatch):
    handler = Calls()
    monkeypatch.setitem(handlers.HANDLERS, "test.counted", handler)
    return handler


def _final(runtime, event_id, wanted=("processed", "ignored", "failed")):
    return wait_until(
        lambda: statuses(runtime).get(event_id) in wanted and rows(runtime),
        what=f"{event_id} to finish",
    )


def test_task_names_and_options_are_the_wire_contract():
    assert (process_webhook.name, sweep_webhooks.name) == (PROCESS_TASK, SWEEP_TASK)
    assert PROCESS_TASK == "billing.webhooks.process" and SWEEP_TASK == "billing.webhooks.sweep"
    assert process_webhook.acks_late and sweep_webhooks.acks_late


def test_1000_concurrent_deliveries_of_one_event_store_one_row_processed_once(
    worker, app_server, webhook_runtime, calls, captured
):
    body = make_event("test.counted", "evt_storm")
    signature = sign(body)
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=64, pool_maxsize=64)
    session.mount("http://", adapter)
    headers = {"Stripe-Signature": signature, "Content-Type": "application/json"}

    def deliver(_: int) -> int:
        return session.post(app_server.url, data=body, headers=headers, timeout=60).status_code

    with ThreadPoolExecutor(max_workers=64) as pool:
        codes = list(pool.map(deliver, range(1000)))
    assert codes == [200] * 1000
    _final(webhook_runtime, "evt_storm")
    time.sleep(0.5)  # any stray second task would run now
    (row,) = rows(webhook_runtime)
    assert (row.status, row.attempts, calls.count) == ("processed", 1, 1)
    assert len(captured.messages(logs.WEBHOOK_ACCEPTED)) == 1
    assert len(captured.messages(logs.WEBHOOK_DUPLICATE)) == 999


def test_handler_failing_twice_then_succeeding_is_retried_by_the_worker(
    worker, app_server, webhook_runtime, calls, retries
):
    calls.failures = [handlers.TransientHandlerError("Stripe hiccup")] * 2
    assert post(app_server.url, make_event("test.counted", "evt_flaky")).status_code == 200
    _final(webhook_runtime, "evt_flaky")
    (row,) = rows(webhook_runtime)
    assert (row.status, row.attempts, calls.count, len(retries)) == ("processed", 3, 3, 2)
    assert row.last_error is None


def test_always_failing_ends_failed_then_replay_processes_it_once_fixed(
    worker, app_server, webhook_runtime, calls, retries, captured
):
    calls.failures = [handlers.TransientHandlerError("still down")] * 100
    assert post(app_server.url, make_event("test.counted", "evt_dead")).status_code == 200
    _final(webhook_runtime, "evt_dead", wanted=("failed",))
    (row,) = rows(webhook_runtime)
    max_retries = webhook_runtime.settings.task_max_retries
    assert (row.status, row.attempts, len(retries)) == ("failed", max_retries + 1, max_retries)
    assert "still down" in row.last_error and "TransientHandlerError" in row.last_traceback

    runner = standalone_app(webhook_runtime).test_cli_runner()
    listed = runner.invoke(args=["billing", "webhooks", "list", "--status", "failed"])
    assert listed.exit_code == 0 and '"evt_dead"' in listed.output

    calls.failures = []  # the cause is fixed
    replayed = runner.invoke(args=["billing", "webhooks", "replay", "evt_dead"])
    assert replayed.exit_code == 0, replayed.output
    assert '"outcome": "processed"' in replayed.output
    (row,) = rows(webhook_runtime)
    assert (row.status, row.last_error) == ("processed", None)
    assert calls.count == max_retries + 2
    again = runner.invoke(args=["billing", "webhooks", "replay", "evt_dead"])
    assert again.exit_code == 1 and "--force" in again.output
    unknown = runner.invoke(args=["billing", "webhooks", "replay", "evt_unknown"])
    assert unknown.exit_code == 1 and "no stored webhook event" in unknown.output


def test_a_bug_in_a_handler_is_a_dead_letter_at_once(worker, app_server, webhook_runtime, calls):
    calls.failures = [KeyError("items")]
    assert post(app_server.url, make_event("test.counted", "evt_bug")).status_code == 200
    _final(webhook_runtime, "evt_bug")
    (row,) = rows(webhook_runtime)
    assert (row.status, row.attempts, calls.count) == ("failed", 1, 1)
    assert row.last_error == "KeyError: 'items'"


def test_type_without_handler_is_ignored(worker, app_server, webhook_runtime, captured):
    assert post(app_server.url, make_event("customer.created", "evt_other")).status_code == 200
    _final(webhook_runtime, "evt_other")
    assert statuses(webhook_runtime) == {"evt_other": "ignored"}
    (record,) = captured.messages(logs.WEBHOOK_EVENT_IGNORED)
    assert (record.event_id, record.event_type) == ("evt_other", "customer.created")


def test_processed_event_queued_again_is_skipped(
    worker, app_server, webhook_runtime, calls, captured
):
    assert post(app_server.url, make_event("test.counted", "evt_twice")).status_code == 200
    _final(webhook_runtime, "evt_twice")
    process_webhook.apply_async(args=["evt_twice"], queue=webhook_runtime.settings.billing_queue)
    wait_until(lambda: captured.messages(logs.WEBHOOK_ALREADY_PROCESSED), what="skip log")
    assert calls.count == 1
    (record,) = captured.messages(logs.WEBHOOK_ALREADY_PROCESSED)
    assert record.event_id == "evt_twice"


def test_two_workers_never_run_one_event_at_once(webhook_runtime, calls):
    service.store_once(
        webhook_runtime.ingest_engine, {"id": "evt_race", "type": "test.counted", "object": "event"}
    )
    calls.delay = 0.3

    def run() -> service.ProcessOutcome:
        return service.process_event(
            webhook_runtime,
            "evt_race",
            handlers.HANDLERS,
            final_attempt=False,
            transient_errors=handlers.TRANSIENT_ERRORS,
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(lambda _: run(), range(8)))
    assert calls.count == 1
    assert outcomes.count(service.ProcessOutcome.PROCESSED) == 1
    assert set(outcomes) <= {
        service.ProcessOutcome.PROCESSED,
        service.ProcessOutcome.BUSY,
        service.ProcessOutcome.ALREADY_DONE,
    }


def test_broker_down_at_ingest_then_the_sweep_gets_it_processed(
    worker, make_runtime, webhook_settings, webhook_runtime, calls
):
    from tests.fixtures.webhooks import AppServer

    down = make_runtime(webhook_settings.replace(celery_broker_url="redis://127.0.0.1:1/0"))
    server = AppServer(down)
    try:
        assert post(server.url, make_event("test.counted", "evt_later")).status_code == 200
    finally:
        server.close()
    time.sleep(0.3)
    assert statuses(webhook_runtime) == {"evt_later": "received"} and calls.count == 0

    # Too early: the row is younger than the requeue delay, a task may still be on its way.
    assert service.sweep_stuck(webhook_runtime, enqueuer(webhook_runtime)).queued == []
    later = utcnow() + timedelta(seconds=webhook_settings.webhook_requeue_after_seconds + 1)
    swept = service.sweep_stuck(webhook_runtime, enqueuer(webhook_runtime), now=later)
    assert swept.queued == ["evt_later"]
    _final(webhook_runtime, "evt_later")
    assert statuses(webhook_runtime) == {"evt_later": "processed"} and calls.count == 1


def test_sweep_takes_back_an_event_whose_worker_died(worker, webhook_runtime, calls):
    service.store_once(
        webhook_runtime.ingest_engine,
        {"id": "evt_orphan", "type": "test.counted", "object": "event"},
    )
    # A worker claimed it, then died (SIGKILL): the row stays in processing.
    claimed = service.claim(webhook_runtime, "evt_orphan", utcnow())
    assert isinstance(claimed, service.Claim)
    soon = utcnow() + timedelta(seconds=60)
    assert service.sweep_stuck(webhook_runtime, enqueuer(webhook_runtime), now=soon).queued == []
    timeout = webhook_runtime.settings.webhook_processing_timeout_seconds
    later = utcnow() + timedelta(seconds=timeout + 1)
    assert service.sweep_stuck(webhook_runtime, enqueuer(webhook_runtime), now=later).queued == [
        "evt_orphan"
    ]
    # The claim is stale only by the database's clock; make it so, as time passing would.
    with webhook_runtime.session_factory.begin() as session:
        session.execute(
            service.sa.text(
                "UPDATE webhook_events SET updated_at = updated_at - make_interval(secs => :s)"
            ),
            {"s": timeout + 5},
        )
    process_webhook.apply_async(args=["evt_orphan"], queue=webhook_runtime.settings.billing_queue)
    _final(webhook_runtime, "evt_orphan")
    (row,) = rows(webhook_runtime)
    assert (row.status, row.attempts, calls.count) == ("processed", 2, 1)


def test_beat_schedules_the_sweep_and_the_flush_at_minute_13():
    from billing.celery_app import celery_app

    schedule = celery_app.conf.beat_schedule
    tasks = {entry["task"]: entry for entry in schedule.values()}
    assert set(tasks) >= {"billing.webhooks.sweep", "billing.usage.flush_hourly"}
    assert tasks["billing.usage.flush_hourly"]["schedule"].minute == {13}
    assert float(tasks["billing.webhooks.sweep"]["schedule"]) == 60.0


def test_every_guide_webhook_message_carries_event_id_and_type(
    worker, app_server, webhook_runtime, calls, captured
):
    body = make_event("test.counted", "evt_logged")
    post(app_server.url, body), post(app_server.url, body)
    post(app_server.url, make_event("customer.created", "evt_logged_ignored"))
    _final(webhook_runtime, "evt_logged")
    _final(webhook_runtime, "evt_logged_ignored")
    process_webhook.apply_async(args=["evt_logged"], queue=webhook_runtime.settings.billing_queue)
    wait_until(lambda: captured.messages(logs.WEBHOOK_ALREADY_PROCESSED), what="skip log")
    expected = {
        logs.WEBHOOK_ACCEPTED: "evt_logged",
        logs.WEBHOOK_DUPLICATE: "evt_logged",
        logs.WEBHOOK_PROCESSING_STARTED: "evt_logged",
        logs.WEBHOOK_PROCESSING_COMPLETED: "evt_logged",
        logs.WEBHOOK_ALREADY_PROCESSED: "evt_logged",
        logs.WEBHOOK_EVENT_IGNORED: "evt_logged_ignored",
    }
    for message, event_id in expected.items():
        records = [r for r in captured.messages(message) if r.event_id == event_id]
        assert records, message
        assert all(r.event_type for r in records), message
    (completed,) = captured.messages(logs.WEBHOOK_PROCESSING_COMPLETED)
    assert completed.duration_ms >= 0 and completed.task_id


def test_beat_sweep_task_and_cli_queue_a_stranded_event(worker, webhook_runtime, calls):
    for event_id in ("evt_stranded_1", "evt_stranded_2"):
        service.store_once(
            webhook_runtime.ingest_engine,
            {"id": event_id, "type": "test.counted", "object": "event"},
        )
    older = webhook_runtime.settings.webhook_requeue_after_seconds + 5
    with webhook_runtime.session_factory.begin() as session:
        session.execute(
            service.sa.text(
                "UPDATE webhook_events SET updated_at = updated_at - make_interval(secs => :s) "
                "WHERE stripe_event_id = 'evt_stranded_1'"
            ),
            {"s": older},
        )
    sweep_webhooks.apply_async(queue=webhook_runtime.settings.billing_queue)
    _final(webhook_runtime, "evt_stranded_1")
    assert statuses(webhook_runtime)["evt_stranded_2"] == "received"  # too young to sweep

    runner = standalone_app(webhook_runtime).test_cli_runner()
    swept = runner.invoke(args=["billing", "webhooks", "sweep"])
    assert swept.exit_code == 0 and '"queued": 0' in swept.output
    assert calls.count == 1
