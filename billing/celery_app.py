"""The Celery app: configured from billing's Settings, and logging as the CLI does, in one place.

Nothing is read at import. Celery loads its configuration when a worker, beat or a sending command
first needs it; `celery_config()` builds it then from the settings of this process's runtime
(`billing.runtime.get_runtime()`: the environment, or the settings a test or host app installed
with `set_runtime`). These are Celery *defaults*: a deployment's own module
(`celery --config celeryconfig …`, the repo's `celeryconfig.py`) overrides any of them.

Workers and beat of this app log through `billing.logs.configure_logging` (JSON lines,
BILLING_LOG_LEVEL and BILLING_LOG_FORMAT) instead of Celery's text format, and every record a task
logs carries its `task_id` and `task_name`.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

import click
from celery import Celery, current_app, signals
from celery.schedules import crontab

from billing import logs
from billing.config import ConfigError, Settings
from billing.masking import scrub
from billing.runtime import get_runtime
from billing.task_names import (
    FLUSH_HOURLY_TASK,
    RECONCILE_ERROR_REPORTS_TASK,
    RECONCILE_TASK,
    VALIDATE_CONTRACT_TASK,
    WEBHOOK_SWEEP_TASK,
)

# How often beat looks for meter error reports whose summaries have settled.
RECONCILE_ERROR_REPORTS_INTERVAL_SECONDS = 300.0


def celery_config(settings: Settings) -> dict[str, Any]:
    """Every Celery setting billing needs, beat schedule included, from one Settings."""
    queue = settings.billing_queue
    return {
        "broker_url": settings.celery_broker_url,
        "result_backend": settings.celery_result_backend,
        # Redis redelivers an unacknowledged task after the visibility timeout; with acks_late a
        # flush still running then would start again on a second worker. It must outlast the
        # lock TTL and the longest flush (config.py enforces visibility timeout > lock TTL).
        "broker_transport_options": {
            "visibility_timeout": settings.broker_visibility_timeout_seconds
        },
        # Only the hourly flush keeps a result (24 small keys a day). With an expiry Celery's
        # Redis backend calls redis-py's deprecated `setex`; a deployment that wants results to
        # expire sets `result_expires` in its celeryconfig.py.
        "result_expires": None,
        "result_backend_transport_options": {
            "retry_policy": {"max_retries": 3, "interval_start": 0.2}
        },
        "broker_connection_retry_on_startup": True,
        "task_default_queue": queue,
        "task_routes": {"billing.*": {"queue": queue}},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        # The task modules and the worker's metrics endpoint (`billing.ops.worker`): named, not
        # imported, so this module knows no feature; Celery imports them before `worker_init`.
        "imports": (
            "billing.usage.tasks",
            "billing.checks.tasks",
            "billing.webhooks.tasks",
            "billing.ops.worker",
        ),
        # Flower (any event monitor) sees tasks only when workers send events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "beat_schedule": {
            # The hourly usage flush runs at minute 13 (the operations guide's schedule).
            "billing-hourly-usage-flush": {
                "task": FLUSH_HOURLY_TASK,
                "schedule": crontab(minute=13),
                "options": {"queue": queue},
            },
            # The contract check at minute 3: its alert fires before a fail-closed flush at
            # minute 13 would be blocked.
            "billing-contract-validate": {
                "task": VALIDATE_CONTRACT_TASK,
                "schedule": crontab(minute=3),
                "options": {"queue": queue},
            },
            # Queues again stored webhook events no task is working on (broker down at ingest,
            # worker died): no accepted event is ever parked for good.
            "billing-webhook-sweep": {
                "task": WEBHOOK_SWEEP_TASK,
                "schedule": float(settings.webhook_sweep_interval_seconds),
                "options": {"queue": queue},
            },
            # Reconciliation at minute 43, half an hour after the flush starts: its Stripe reads
            # stay clear of the flush's sends (test mode shares 25 requests/s), and it judges only
            # hours older than STRIPE_BILLING_RECONCILE_SETTLE_SECONDS, so a flush still running
            # shows as in flight or not settled, never as drift.
            "billing-usage-reconcile": {
                "task": RECONCILE_TASK,
                "schedule": crontab(minute=43),
                "options": {"queue": queue},
            },
            # A meter error report samples a few of its errors: the rest are looked for once
            # Stripe's summaries of its window settled. Every 5 minutes: a report is due
            # STRIPE_BILLING_RECONCILE_SETTLE_SECONDS after its window, and the run is a no-op
            # (one indexed query) when none is.
            "billing-meter-error-reports-reconcile": {
                "task": RECONCILE_ERROR_REPORTS_TASK,
                "schedule": RECONCILE_ERROR_REPORTS_INTERVAL_SECONDS,
                "options": {"queue": queue},
            },
        },
    }


def process_settings() -> Settings:
    """This process's settings; a bad one stops a worker, beat or command with one line."""
    try:
        return get_runtime().settings
    except ConfigError as error:
        # Celery's and Flask's command lines are click: this prints `Error: …` and exits 1.
        raise click.ClickException(scrub(f"configuration error: {error}")) from error


celery_app = Celery("billing")
celery_app.add_defaults(lambda: celery_config(process_settings()))


def _is_billing_worker() -> bool:
    # Celery's signals are process-wide: leave a host application's own worker alone.
    return current_app._get_current_object() is celery_app


def _log_like_the_cli(others_level: int | str) -> None:
    settings = process_settings()
    logs.configure_logging(settings.log_level, settings.log_format, others_level=others_level)


@signals.celeryd_init.connect
def _log_from_worker_start(instance: Any = None, **_: Any) -> None:
    """Early, so the worker's start-up warnings are JSON lines too."""
    if getattr(instance, "app", None) is celery_app:
        _log_like_the_cli(getattr(instance, "loglevel", None) or "INFO")


@signals.after_setup_logger.connect
def _replace_celery_log_format(
    logger: logging.Logger, loglevel: int | None = None, **_: Any
) -> None:
    """Workers and beat: billing's JSON lines instead of Celery's text; --loglevel sets others'."""
    if not _is_billing_worker():
        return
    for handler in list(logger.handlers):  # the text handler Celery has just installed
        logger.removeHandler(handler)
    _log_like_the_cli(loglevel or "INFO")


@signals.after_setup_task_logger.connect
def _task_logs_through_root(logger: logging.Logger, **_: Any) -> None:
    if _is_billing_worker():
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


# task_prerun and task_postrun run in the thread that runs the task, around it.
_task_fields: dict[str, contextvars.Token[Any]] = {}


@signals.task_prerun.connect
def _bind_task_fields(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task_id is not None and task is not None:
        _task_fields[task_id] = logs.bind_fields(task_id=task_id, task_name=task.name)


@signals.task_postrun.connect
def _unbind_task_fields(task_id: str | None = None, **_: Any) -> None:
    token = _task_fields.pop(task_id or "", None)
    if token is not None:
        logs.unbind_fields(token)
