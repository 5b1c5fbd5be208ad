"""The flush's Celery task and its enqueueing, and the scheduled reconciliation: thin adapters over
`billing.usage.service` and `billing.usage.reconcile`. Task names are a wire contract: keep them.

The retry policy is read when a task runs, from the settings of the worker's runtime (the
environment at worker start, or what a test or host app installed): nothing is fixed at import.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from celery import Task
from kombu.exceptions import OperationalError

from billing.celery_app import celery_app
from billing.config import Settings
from billing.errors import OperatorError
from billing.masking import scrub
from billing.runtime import get_runtime
from billing.task_names import (
    FLUSH_HOURLY_TASK,
    RECONCILE_ERROR_REPORTS_TASK,
    RECONCILE_TASK,
    SUBMIT_PARTS_TASK,
)
from billing.usage import fanout, retry_policy
from billing.usage.error_reports import reconcile_error_reports
from billing.usage.reconcile import reconcile_scheduled
from billing.usage.service import TRANSIENT_ERRORS, flush_guarded


class BrokerUnavailableError(RuntimeError, OperatorError):
    """The Celery broker refused or dropped the connection: nothing was queued."""


@celery_app.task(name=FLUSH_HOURLY_TASK, bind=True, acks_late=True)
def flush_hourly_usage(self: Task) -> dict[str, Any]:
    """The hourly flush under the overlap lock; transient failures retry with backoff.

    Celery's retries are the run's passes: they share the run's call budget per row
    (`usage.retry_policy`), and the last pass raises instead of retrying."""
    runtime = get_runtime()
    settings = runtime.settings
    passes = 1 + settings.task_max_retries
    pass_index = self.request.retries
    fan_out = (
        fanout.Coordinator(runtime, enqueue_submit_parts) if settings.submit_fanout_tasks else None
    )
    try:
        calls = retry_policy.calls_in_pass(pass_index, passes)
        result = flush_guarded(runtime, call_attempts=calls, fan_out=fan_out)
        return result.raise_if_transient().to_dict()
    except TRANSIENT_ERRORS as error:
        if retry_policy.is_last_pass(pass_index, passes):
            raise
        raise self.retry(
            exc=error,
            countdown=retry_policy.retry_countdown(settings, pass_index),
            max_retries=settings.task_max_retries,
        ) from error


@celery_app.task(name=SUBMIT_PARTS_TASK, bind=True, acks_late=True, ignore_result=True)
def submit_usage_parts(self: Task, run_id: str) -> dict[str, Any]:
    """Send the parts of a fanned-out hourly run that no other process holds. Nothing retries:
    the run's coordinator sends whatever is left (`billing.usage.fanout`)."""
    return fanout.submit_parts(get_runtime(), run_id).to_dict()


def enqueue_hourly_flush(settings: Settings) -> str:
    """Queue the hourly flush on these settings' broker and queue; returns the task id."""
    with _broker(settings) as connection:
        result = flush_hourly_usage.apply_async(queue=settings.billing_queue, connection=connection)
    return str(result.id)


def enqueue_submit_parts(settings: Settings, run_id: str, count: int) -> None:
    """`count` submit tasks for the parts of `run_id`, on the billing queue."""
    with _broker(settings) as connection:
        for _ in range(count):
            submit_usage_parts.apply_async(
                (run_id,), queue=settings.billing_queue, connection=connection
            )


@contextlib.contextmanager
def _broker(settings: Settings) -> Iterator[Any]:
    try:
        with celery_app.connection_for_write(settings.celery_broker_url) as connection:
            yield connection
    except (OperationalError, OSError) as error:
        raise BrokerUnavailableError(
            f"Celery broker unreachable at {scrub(settings.celery_broker_url)}: {error}; "
            "nothing was queued"
        ) from error


@celery_app.task(name=RECONCILE_TASK, bind=True, acks_late=True, ignore_result=True)
def reconcile_usage(self: Task) -> dict[str, Any]:
    """The outbox against Stripe's summaries over the settled hours (beat, minute 43); logged and
    recorded. Nothing retries: what Stripe could not answer is `unknown`, and the next hour's run
    reads it again."""
    report = reconcile_scheduled(get_runtime(), source="schedule")
    return {"ok": report.ok, "groups": report.counts()}


@celery_app.task(name=RECONCILE_ERROR_REPORTS_TASK, bind=True, acks_late=True, ignore_result=True)
def reconcile_meter_error_reports(self: Task) -> list[dict[str, Any]]:
    """The meter error reports whose summaries settled: their unsampled errors are looked for
    (beat, every 5 minutes). A report that cannot be judged yet waits for the next run."""
    return [result.to_dict() for result in reconcile_error_reports(get_runtime())]
