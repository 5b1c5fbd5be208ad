from datetime import UTC, datetime

import pytest
from freezegun import freeze_time

import celeryconfig
from billing.celery_app import celery_app
from billing.tasks import FLUSH_HOURLY_TASK

ENTRY = celeryconfig.beat_schedule["billing-hourly-usage-flush"]


def _is_due(now: str, last_run: str) -> bool:
    schedule = ENTRY["schedule"]
    schedule.app = celery_app
    with freeze_time(now):
        return schedule.is_due(datetime.fromisoformat(last_run).replace(tzinfo=UTC)).is_due


@pytest.mark.parametrize(
    ("now", "due"),
    [("2026-11-25T14:12:30", False), ("2026-11-25T14:13:00", True), ("2026-11-25T14:14:00", True)],
)
def test_due_from_minute_13_after_the_previous_run(now, due):
    assert _is_due(now, "2026-11-25T13:13:00") is due


def test_not_due_again_at_minute_14_after_running_at_13():
    assert _is_due("2026-11-25T14:14:00", "2026-11-25T14:13:00") is False


def test_entry_runs_the_named_task_on_the_billing_queue():
    assert ENTRY["task"] == FLUSH_HOURLY_TASK == "billing.usage.flush_hourly"
    assert ENTRY["options"]["queue"] == celery_app.conf.task_default_queue
    assert FLUSH_HOURLY_TASK in celery_app.tasks


def test_broker_redelivery_outlasts_the_lock():
    visibility = celery_app.conf.broker_transport_options["visibility_timeout"]
    assert visibility > 3300 and celery_app.conf.task_acks_late
