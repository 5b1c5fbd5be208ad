"""`flask billing status`: last flush, backlog, outbox and webhook rows, the lock's holder."""

from __future__ import annotations

import json
from datetime import timedelta

from billing import create_app
from billing.models import UsageSubmission, WebhookEvent, utcnow
from billing.usage.lock import RedisFlushLock
from billing.usage.service import flush_guarded
from tests.factories import add_accounts, add_events


def status(settings, *flags):
    result = create_app(settings).test_cli_runner().invoke(args=["billing", "status", *flags])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_status_reports_backlog_then_the_flush_that_cleared_it(billing_runtime, emulator):
    settings = billing_runtime.settings
    add_accounts(billing_runtime, [1])
    old = utcnow() - timedelta(hours=3)
    add_events(
        billing_runtime,
        [
            {"organization_id": 1, "event_type": "api_call", "quantity": 5, "occurred_at": old},
            {
                "organization_id": 1,
                "event_type": "api_call",
                "quantity": 2,
                "occurred_at": utcnow() - timedelta(minutes=5),
            },
        ],
    )
    before = json.loads(status(settings, "--json"))
    assert before["backlog"]["unclaimed_events"] == 2
    assert 3 * 3600 - 60 < before["backlog"]["oldest_unbilled_age_seconds"] < 3 * 3600 + 60
    assert before["flush"]["last_run"] is None and before["lock"] == {"held": False}

    assert flush_guarded(billing_runtime).ok
    after = json.loads(status(settings, "--json"))
    assert after["backlog"]["unclaimed_events"] == 0
    assert after["backlog"]["oldest_unbilled_at"] is None
    last = after["flush"]["last_run"]
    assert last["result"] == "ok" and last["events_claimed"] == 2
    assert last["billed_value"] == {"api_call": 7}
    assert after["flush"]["last_success"] == last
    assert after["outbox_by_status"] == {"pending": 0, "held": 0, "failed": 0, "rejected": 0}
    text = status(settings)
    assert "last flush: " in text and " ok (claimed 2, sent " in text
    assert "flush lock: free" in text


def test_status_names_the_lock_holder_and_open_rows(billing_runtime, redis_client, emulator):
    settings = billing_runtime.settings
    with billing_runtime.session_factory.begin() as session:
        session.add(WebhookEvent(stripe_event_id="evt_1", type="x", payload={}, status="failed"))
        session.add(
            UsageSubmission(
                organization_id=1,
                stripe_customer_id="cus_1",
                event_type="api_call",
                event_name="api_call",
                value=3,
                event_count=1,
                window_start=utcnow() - timedelta(hours=30),
                window_end=utcnow(),
                identifier="held-1",
                status="held",
                attempts=1,
            )
        )
    lock = RedisFlushLock(
        redis_client, settings.flush_lock_key, 30, lease_seconds=5, task_id="task-abc"
    )
    assert lock.acquire()
    try:
        assert flush_guarded(billing_runtime).skipped
        shown = json.loads(status(settings, "--json"))
        text = status(settings)
    finally:
        lock.release()
    assert shown["lock"]["holder"]["task_id"] == "task-abc" and shown["lock"]["heartbeat_alive"]
    assert shown["outbox_by_status"]["held"] == 1 and shown["dead_letters"] == 1
    assert shown["flush"]["last_run"]["result"] == "skipped_lock"
    assert shown["flush"]["consecutive_lock_skips"] == 1
    assert "task task-abc" in text and "heartbeat alive" in text
    assert "runs skipped by the lock in a row: 1" in text
    assert 29 * 3600 < shown["backlog"]["oldest_unbilled_age_seconds"] < 31 * 3600


def test_status_with_redis_down_still_shows_the_runs_it_refused(billing_runtime, emulator):
    from tests.fixtures.processes import contract_breaking_usage, free_port

    contract_breaking_usage(billing_runtime)
    down = billing_runtime.settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    app = create_app(down)
    runner = app.test_cli_runner()
    assert runner.invoke(args=["billing", "flush_hourly"]).exit_code == 1
    assert runner.invoke(args=["billing", "validate_contract", "--fail-closed"]).exit_code == 1

    result = runner.invoke(args=["billing", "status"])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert "runs refused with Redis unreachable in a row: 3" in lines
    [last] = [line for line in lines if line.startswith("last flush: ")]
    assert " lock_unavailable: LockUnavailableError: Redis lock backend unreachable" in last
    [validation] = [line for line in lines if line.startswith("last contract validation: ")]
    assert validation.endswith(
        " FAILED quantity_positive_integer, event_type_has_meter (cli, 30 days)"
    ), validation
    assert lines[-1].startswith("flush lock: unknown (Redis error: ")
    assert result.stderr.strip().startswith("Error: Redis error: ")
    assert len(result.stderr.strip().splitlines()) == 1
