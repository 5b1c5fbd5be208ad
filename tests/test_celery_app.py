import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from billing.celery_app import celery_app
from billing.task_names import FLUSH_HOURLY_TASK

ENTRY = celery_app.conf.beat_schedule["billing-hourly-usage-flush"]


def is_due(entry: dict[str, Any], now: str, last_run: str) -> bool:
    """Whether beat would run `entry` at `now` (UTC) after it last ran at `last_run`.

    The schedule's own clock is set, not the process's: freezing time (freezegun) in a test
    session froze the asyncio timers of the session's emulator too, which then ran no due work
    (meter error reports, renewals) for the rest of the session."""
    schedule = copy.copy(entry["schedule"])
    schedule.app = celery_app
    schedule.nowfun = lambda: datetime.fromisoformat(now).replace(tzinfo=UTC)
    return schedule.is_due(datetime.fromisoformat(last_run).replace(tzinfo=UTC)).is_due


def _is_due(now: str, last_run: str) -> bool:
    return is_due(ENTRY, now, last_run)


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


def test_celery_settings_come_from_the_settings_given():
    from billing.celery_app import celery_config
    from billing.config import Settings

    config = celery_config(
        Settings(
            billing_queue="billing-x",
            celery_broker_url="redis://broker.example:6379/3",
            flush_lock_ttl_seconds=1800,
            broker_visibility_timeout_seconds=9000,
        )
    )
    assert config["broker_url"] == "redis://broker.example:6379/3"
    assert config["task_default_queue"] == "billing-x"
    assert config["task_routes"] == {"billing.*": {"queue": "billing-x"}}
    entry = config["beat_schedule"]["billing-hourly-usage-flush"]
    assert entry["options"] == {"queue": "billing-x"}
    assert config["broker_transport_options"] == {"visibility_timeout": 9000}


def test_the_repos_celeryconfig_delegates_to_the_package():
    import celeryconfig
    from billing.celery_app import celery_config
    from billing.runtime import get_runtime

    for name, value in celery_config(get_runtime().settings).items():
        if name != "beat_schedule":  # crontab objects compare by identity of their app
            assert getattr(celeryconfig, name) == value, name
    assert celeryconfig.beat_schedule.keys() == celery_app.conf.beat_schedule.keys()


RECONCILE_ENTRY = celery_app.conf.beat_schedule["billing-usage-reconcile"]


@pytest.mark.parametrize(
    ("now", "due"),
    [("2026-11-25T14:13:00", False), ("2026-11-25T14:42:59", False), ("2026-11-25T14:43:00", True)],
)
def test_reconciliation_is_due_at_minute_43_not_at_the_flushs_13(now, due):
    assert is_due(RECONCILE_ENTRY, now, "2026-11-25T13:43:00") is due


def test_reconciliation_entry_runs_its_named_task_on_the_billing_queue():
    from billing.task_names import RECONCILE_TASK

    assert RECONCILE_ENTRY["task"] == RECONCILE_TASK == "billing.usage.reconcile"
    assert RECONCILE_ENTRY["options"]["queue"] == celery_app.conf.task_default_queue
    assert RECONCILE_TASK in celery_app.tasks


def test_meter_error_reports_are_looked_at_every_five_minutes_by_their_named_task():
    from billing.task_names import RECONCILE_ERROR_REPORTS_TASK

    entry = celery_app.conf.beat_schedule["billing-meter-error-reports-reconcile"]
    assert entry["task"] == RECONCILE_ERROR_REPORTS_TASK
    assert RECONCILE_ERROR_REPORTS_TASK == "billing.usage.reconcile_error_reports"
    assert entry["schedule"] == 300 and RECONCILE_ERROR_REPORTS_TASK in celery_app.tasks
